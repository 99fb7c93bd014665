"""MAML-RL (algo=maml_rl) on 2D navigation: the meta-gradient through the policy-gradient inner
step against float64 finite differences, TRPO's KL constraint, exact resume, and a short run whose
adapted policy beats the unadapted one."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import sigterm_after

from metarun.algorithms.maml_rl import MAMLRL, MAMLRLConfig
from metarun.data.navigation2d import GoalTasks, Navigation2D, Navigation2DConfig
from metarun.models.mlp import MLP
from metarun.rl import Batch, trpo_step
from metarun.rl.episodes import discounted_returns, gae, linear_baseline
from metarun.rl.policy import gaussian_kl, gaussian_log_prob
from metarun.runner import api
from metarun.runner.checkpoint import load_checkpoint

# A navigation run of a few seconds: short episodes, a small policy, few tasks.
TINY_RL = [
    "algo=maml_rl",
    "dataset=navigation2d",
    "dataset.horizon=10",
    "model.hidden=[32,32]",
    "meta_batch_size=4",
    "algo.fast_batch_size=5",
    "outer_steps=4",
    "eval.every=0",
    "eval.num_tasks=8",
    "eval.batch_size=8",
    "eval.curve_steps=[]",
    "log.every=1",
    "save.every=2",
    "log.progress=false",
    "log.tensorboard=false",
    "device=cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _algo(first_order: bool = False, inner_lr: float = 0.3) -> MAMLRL:
    config = MAMLRLConfig(
        inner_lr=inner_lr, inner_steps=1, eval_inner_steps=1, first_order=first_order
    )
    algo = MAMLRL(MLP(2, (6,), 2), config, Navigation2DConfig())
    with torch.no_grad():
        algo.log_std.fill_(-0.3)
    return algo.double()


def _fixed_batch(tasks: int, samples: int, generator: torch.Generator) -> Batch:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    mask = torch.ones(tasks, samples, dtype=torch.float64)
    mask[:, -2:] = 0.0  # an episode that ended early: its last steps must not count
    return Batch(randn(tasks, samples, 2), randn(tasks, samples, 2), randn(tasks, samples), mask)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_finite_differences(first_order):
    """The gradient of the meta-objective (surrogate of the adapted policy on fixed post-
    adaptation episodes, adapted by one VPG step on fixed pre-adaptation episodes) against
    central differences in float64; first order: against the objective with the inner
    gradient held at its value at the initial parameters."""
    g = torch.Generator().manual_seed(0)
    algo = _algo(first_order)
    inner = (_fixed_batch(3, 9, g),)
    post = _fixed_batch(3, 9, g)
    old_logp = torch.randn(3, 9, generator=g, dtype=torch.float64) * 0.1 - 2.0
    theta = {k: v.detach() for k, v in algo.params().items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    grad = torch.autograd.grad(algo.surrogate(leaves, inner, post, old_logp), list(leaves.values()))
    analytic = dict(zip(leaves, grad))

    if first_order:
        # theta' = theta - lr * g(theta0): the inner gradient is a constant.
        def task(batch: Batch, i: int) -> Batch:
            return Batch(*(t[i] for t in batch))

        inner_grad = [
            dict(zip(leaves, torch.autograd.grad(
                algo.inner_loss(leaves, task(inner[0], i)), list(leaves.values())
            )))
            for i in range(3)
        ]  # fmt: skip
        valid = float(post.mask[0].sum())

        def objective(p: dict[str, torch.Tensor]) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float64)
            for i in range(3):
                adapted = {k: p[k] - 0.3 * inner_grad[i][k] for k in p}
                task_post = task(post, i)
                ratio = (algo._log_prob(adapted, task_post.observations, task_post.actions)
                         - old_logp[i]).exp()  # fmt: skip
                total = total - (ratio * task_post.advantages * task_post.mask).sum() / valid
            return total / 3
    else:

        def objective(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return algo.surrogate(p, inner, post, old_logp)

    eps = 1e-6
    with torch.no_grad():
        for key, value in theta.items():
            numeric = torch.zeros_like(value)
            for index in range(value.numel()):
                bump = torch.zeros_like(value).view(-1)
                bump[index] = eps
                bump = bump.view_as(value)
                up = objective({**theta, key: value + bump})
                down = objective({**theta, key: value - bump})
                numeric.view(-1)[index] = (up - down) / (2 * eps)
            torch.testing.assert_close(analytic[key], numeric, rtol=1e-6, atol=1e-8, msg=key)
    if not first_order:
        # Second order differs from first order: the check above saw the inner Hessian.
        fo = _algo(True)
        fo.load_state_dict(algo.state_dict())
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        fo_grad = torch.autograd.grad(
            fo.surrogate(leaves, inner, post, old_logp), list(leaves.values())
        )
        assert not all(torch.allclose(a, b) for a, b in zip(grad, fo_grad))


def test_later_inner_steps_take_inner_lr_later():
    """Two inner steps: the first of inner_lr, the second of inner_lr_later (Finn et al. 2017,
    App. A.2 halved the rate after the first step), against the steps written out with autograd
    in float64; the meta-gradient through both steps against central differences."""
    g = torch.Generator().manual_seed(5)
    algo = _algo(inner_lr=0.3)
    algo.config.inner_lr_later = 0.05
    later = MAMLRL(algo.model, algo.config, algo.dataset).double()
    later.log_std = algo.log_std
    b0, b1, post = (_fixed_batch(1, 7, g) for _ in range(3))
    one = lambda b: Batch(*(t[0] for t in b))  # noqa: E731  (the single task of a batch)
    theta = {k: v.detach() for k, v in later.params().items()}

    def step(p: dict[str, torch.Tensor], batch: Batch, lr: float) -> dict[str, torch.Tensor]:
        leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        grads = torch.autograd.grad(later.inner_loss(leaves, batch), list(leaves.values()))
        return {k: p[k] - lr * d for (k, d) in zip(leaves, grads)}

    expected = step(step(theta, one(b0), 0.3), one(b1), 0.05)
    adapted = later.adapt_task(theta, (one(b0), one(b1)))
    for key in theta:
        torch.testing.assert_close(adapted[key], expected[key], rtol=1e-12, atol=1e-14)
    # Unset, the later steps take inner_lr: a different second step.
    algo.config.inner_lr_later = None
    same = MAMLRL(algo.model, algo.config, algo.dataset).double()
    same.log_std = algo.log_std
    plain = same.adapt_task(theta, (one(b0), one(b1)))
    assert not torch.allclose(plain["log_std"], adapted["log_std"])

    old_logp = torch.randn(1, 7, generator=g, dtype=torch.float64) * 0.1 - 2.0
    inner = (b0, b1)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    objective = later.surrogate(leaves, inner, post, old_logp)
    grad = torch.autograd.grad(objective, list(leaves.values()))
    eps = 1e-6
    with torch.no_grad():
        for (key, value), analytic in zip(theta.items(), grad):
            numeric = torch.zeros_like(value).view(-1)
            for index in range(value.numel()):
                bump = torch.zeros_like(value).view(-1)
                bump[index] = eps
                up = later.surrogate({**theta, key: value + bump.view_as(value)}, inner, post,
                                     old_logp)  # fmt: skip
                down = later.surrogate({**theta, key: value - bump.view_as(value)}, inner, post,
                                       old_logp)  # fmt: skip
                numeric[index] = (up - down) / (2 * eps)
            torch.testing.assert_close(analytic, numeric.view_as(value), rtol=1e-6, atol=1e-8)


def test_policy_starts_as_the_authors_policy():
    """policy_init=glorot, the default (cbfinn/maml_rl's create_MLP): Glorot-uniform weights and
    zero biases, so the mean action at the start position is 0; policy_init=model keeps the
    model's own initialisation (torch's, whose biases give a random drift at the start)."""
    import math

    from metarun.algorithms.maml_rl import PolicyInit

    def config(init: PolicyInit) -> MAMLRLConfig:
        return MAMLRLConfig(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, policy_init=init)

    torch.manual_seed(0)
    model = MLP(2, (100, 100), 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    kept = MAMLRL(model, config(PolicyInit.model), Navigation2DConfig())
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    origin = torch.zeros(2)
    assert kept.predict(kept.params(), origin).abs().max() > 1e-3

    algo = MAMLRL(model, config(PolicyInit.glorot), Navigation2DConfig())
    assert config(PolicyInit.glorot).policy_init is MAMLRLConfig().policy_init
    layers = [m for m in algo.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound
        # uniform on [-bound, bound]: standard deviation bound / sqrt(3)
        assert abs(float(layer.weight.detach().std()) - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.equal(algo.predict(algo.params(), origin), torch.zeros(2))
    assert algo.predict(algo.params(), torch.tensor([0.3, -0.2])).abs().max() > 0


def test_trpo_step_satisfies_its_kl_constraint():
    """On a Gaussian policy with fixed samples: the step lowers the surrogate, keeps the mean KL
    within max_kl, and reaches the constraint's boundary to first order (the quadratic model
    is close at a small max_kl), along the natural gradient."""
    g = torch.Generator().manual_seed(1)
    n = 400
    old = {
        "mean": torch.zeros(2, dtype=torch.float64),
        "log_std": torch.zeros(2, dtype=torch.float64),
    }
    actions = torch.randn(n, 2, generator=g, dtype=torch.float64)
    adv = (
        actions[:, 0] + 0.5 * actions[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    )
    old_logp = gaussian_log_prob(old["mean"], old["log_std"], actions)

    def loss(p):
        return -(
            (gaussian_log_prob(p["mean"], p["log_std"], actions) - old_logp).exp() * adv
        ).mean()

    def kl(p):
        return gaussian_kl(old["mean"], old["log_std"], p["mean"], p["log_std"])

    for max_kl in (1e-3, 1e-2, 5e-2):
        out = trpo_step(loss, kl, old, max_kl=max_kl)
        new = {k: old[k] + out.step[k] for k in old}
        assert out.backtracks >= 0
        assert float(kl(new)) <= max_kl
        assert float(loss(new)) < float(loss(old))
        if max_kl == 1e-3:
            assert float(kl(new)) > 0.9 * max_kl  # no backtracking needed: on the boundary
            # Fisher of a unit Gaussian: diag(1, 1, 2, 2); the step is F^-1 (-grad), scaled.
            point = {k: v.clone().requires_grad_(True) for k, v in old.items()}
            grad = torch.autograd.grad(loss(point), [point["mean"], point["log_std"]])
            natural = torch.cat([-grad[0], -grad[1] / 2])
            step = torch.cat([out.step["mean"], out.step["log_std"]])
            assert torch.nn.functional.cosine_similarity(step, natural, dim=0) > 0.999


@pytest.mark.parametrize("outer", ["trpo", "ppo"])
def test_meta_train_step_lowers_the_meta_objective(outer):
    """Both outer steps lower their objective on the step's episodes; TRPO's within max_kl."""
    from metarun.algorithms.maml_rl import OuterName

    algo = _algo(inner_lr=0.1).float()
    algo.config.fast_batch_size = 4
    algo.config.outer = OuterName(outer)
    algo.dataset = Navigation2DConfig(horizon=15)
    batch = GoalTasks(-0.5, 0.5).sample(3, torch.Generator().manual_seed(0))
    metrics = algo.meta_train_step(batch)
    assert float(metrics["train/kl"]) > 0
    if outer == "trpo":
        assert float(metrics["train/kl"]) <= algo.config.max_kl
    assert float(metrics["train/meta_loss"]) < float(metrics["train/meta_loss_before"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.meta_parameters())


def test_advantages_with_a_linear_baseline():
    """Returns-to-go, GAE with lambda=1 equals returns minus the baseline, and the linear-feature
    baseline fits returns that are linear in its features exactly."""
    rewards = torch.tensor([[[1.0, 2.0, 3.0, 0.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]], dtype=torch.float64)
    returns = discounted_returns(rewards, 0.5)
    torch.testing.assert_close(
        returns, torch.tensor([[[2.75, 3.5, 3.0, 0.0]]], dtype=torch.float64)
    )
    values = torch.tensor([[[0.5, 1.0, 1.5, 9.0]]], dtype=torch.float64)
    torch.testing.assert_close(gae(rewards, values, mask, 0.5, 1.0), (returns - values) * mask)
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(2, 5, 7, 2, generator=g, dtype=torch.float64)
    full = torch.ones(2, 5, 7, dtype=torch.float64)
    target = 3 * obs[..., 0] - obs[..., 1].square() + 0.5
    torch.testing.assert_close(
        linear_baseline(obs, full, target, reg=1e-10), target, atol=1e-6, rtol=0
    )


def test_navigation_dynamics_follow_the_authors_environment():
    env = Navigation2D(horizon=5)
    goals = torch.tensor([[0.05, 0.0], [-0.3, 0.2]])
    obs = env.reset(goals, 2)
    assert obs.shape == (2, 2, 2) and not obs.any()
    # Actions are clipped to [-1, 1] and scaled by 0.1; the first task's goal is reached.
    obs, reward, done = env.step(torch.tensor([[[0.5, 0.0], [5.0, 0.0]]] * 2))
    torch.testing.assert_close(obs[0], torch.tensor([[0.05, 0.0], [0.1, 0.0]]))
    torch.testing.assert_close(reward[0], torch.tensor([0.0, -0.05]))
    assert done[0].tolist() == [True, False] and not done[1].any()


@pytest.fixture
def train_rl(make_config):
    def _run(run_dir, overrides=()):
        args = [*TINY_RL, *overrides]
        return api.run(make_config(args), run_dir, overrides=args)

    return _run


def test_resume_is_exact(train_rl, tmp_path, monkeypatch):
    once = train_rl(tmp_path / "once")
    assert once.step == 4
    with sigterm_after(2):
        cut = train_rl(tmp_path / "cut")
    assert cut.stopped_by == "SIGTERM" and cut.step == 2
    resumed = train_rl(tmp_path / "cut", ["resume=true"])
    assert resumed.step == 4
    a = load_checkpoint(tmp_path / "once/checkpoints/last.pt")["algorithm"]
    b = load_checkpoint(tmp_path / "cut/checkpoints/last.pt")["algorithm"]
    assert a.keys() == b.keys() and "log_std" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert once.results["test"]["metrics"] == resumed.results["test"]["metrics"]


def test_short_run_adapts_better_than_it_starts(train_rl, tmp_path):
    """After a few outer steps, one policy-gradient step on a new goal raises the return on it
    (mean over the fixed test goals, beyond the 95% interval of the pre-adaptation mean). Six
    outer steps: from the authors' start (mean action 0 at the origin, not a random drift)
    three were too few for a margin beyond that interval (seeds 0 to 3 pass with six)."""
    summary = train_rl(
        tmp_path / "run",
        ["dataset.horizon=50", "outer_steps=6", "eval.num_tasks=16", "eval.curve_steps=[0,1]"],
    )
    metrics = summary.results["test"]["metrics"]
    post, pre = metrics["return"], metrics["pre_return"]
    assert post["n"] == pre["n"] == 16
    assert post["mean"] > pre["mean"] + pre["ci95"], (pre, post)
    # The curve (Fig. 5): after 0 steps the pre-adaptation return, after 1 the test's.
    curve = {point["inner_steps"]: point["return"] for point in summary.results["curve"]}
    assert curve[0]["mean"] == pre["mean"] and curve[1]["mean"] == post["mean"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "run" / "figures" / "adaptation_curve.png").stat().st_size > 0
    assert "test return: " in summary.format()  # the CLI's summary shows what RL measures


def test_validation_keeps_the_best_return(train_rl, tmp_path):
    """best.pt is picked by val/return, higher being better (RL runs have no val/loss)."""
    summary = train_rl(tmp_path / "run", ["outer_steps=2", "eval.every=1", "save.keep_best=true"])
    best = summary.results["best"]
    assert best is not None and best["metric"] == "val/return", best
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_docs_page_lists_every_key():
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "rl.md").read_text()
    missing = [f.name for f in dataclasses.fields(MAMLRLConfig) if f"`{f.name}`" not in text]
    assert not missing, f"keys of algo=maml_rl not in docs/rl.md: {missing}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["meta_optimizer.name=adam"], "meta_optimizer.name=sgd meta_optimizer.lr=1.0"),
        (["meta_optimizer.lr=0.5"], "got meta_optimizer.name=sgd meta_optimizer.lr=0.5"),
        (["grad_clip=10"], "grad_clip must be null for algo=maml_rl, got 10.0"),
        (["algo.max_kl=0"], "algo.max_kl must be > 0, got 0.0"),
        (["algo.inner_lr_later=0"], "algo.inner_lr_later must be > 0 or null"),
        (["algo.fast_batch_size=0"], "algo.fast_batch_size must be >= 1, got 0"),
        (["algo=maml"], "algo=maml does not fit dataset=navigation2d"),
        (["dataset=sinusoid"], "algo=maml_rl does not fit dataset=sinusoid"),
        (["model.in_features=3"], "model.in_features must be 2 for dataset=navigation2d"),
    ],
)
def test_bad_settings_name_the_key(make_config, overrides, expected):
    from metarun.spec.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        make_config(["algo=maml_rl", "dataset=navigation2d", *overrides])
    assert expected in str(error.value)


def test_first_order_fisher_products_treat_the_inner_step_as_the_identity():
    """With first_order=true the adapted parameters move one-for-one with the initial ones, so
    TRPO's Fisher-vector product (the KL's Hessian through the inner step, by
    metarun.unroll.implicit.hvp) is the KL's Hessian in the adapted parameters."""
    from metarun.unroll.implicit import hvp

    g = torch.Generator().manual_seed(3)
    algo = _algo(first_order=True)
    inner, post = (_fixed_batch(2, 5, g),), _fixed_batch(2, 5, g)
    theta = {k: v.detach() for k, v in algo.params().items()}
    adapted = torch.func.vmap(algo.adapt_task, in_dims=(None, 0))(theta, inner)
    old_mean, old_log_std = torch.func.vmap(algo._dist)(adapted, post.observations)
    old_log_std = old_log_std.unsqueeze(1)
    per_task = torch.func.vmap(algo.task_kl, in_dims=(None, 0, 0, 0, 0))

    def through_inner(p):
        return per_task(p, inner, post, old_mean, old_log_std).mean()

    def in_adapted(p):
        total = torch.zeros((), dtype=torch.float64)
        for i in range(2):
            moved = {k: v[i] + (p[k] - theta[k]) for k, v in adapted.items()}
            mean, log_std = algo._dist(moved, post.observations[i])
            kl = gaussian_kl(old_mean[i], old_log_std[i], mean, log_std)
            total = total + (kl * post.mask[i]).sum() / post.mask[i].sum()
        return total / 2

    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in theta.items()}
    a, b = hvp(through_inner, theta)(v), hvp(in_adapted, theta)(v)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12)
    assert any(a[key].abs().sum() > 0 for key in a)
