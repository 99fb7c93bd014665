"""Meta-Weight-Net (``algo=mwn``) and the look-ahead it shares with L2RW: L2RW unchanged by the
shared piece (bit for bit), MWN's meta-gradient in float64 against finite differences and a
hand-written reference, exact resume, the weighting-function plot, configs, and the acceptance
run on the MNIST test split (MWN beats plain training at pos_ratio 0.995)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    MNIST_0995,
    MNIST_TINY,
    CentralDifference,
    SmallNet,
    ThreadAllReduce,
    read_metrics,
    run_and_resume,
    run_in_threads,
    small_batch,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from metarun.algorithms.l2rw import L2RW
from metarun.algorithms.lookahead import LookAhead
from metarun.algorithms.mwn import MWN, WeightNet, weight_net_optimizer
from metarun.config import ConfigError
from metarun.runner import api
from metarun.runner import logging as run_logging
from metarun.tasks import TaskBatch
from metarun.testing import write_cifar
from metarun.unroll import get_diff_optim, monkeypatch

DT = torch.float64


def _warm(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    """One real step, so that the look-ahead starts from non-trivial optimizer state."""
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


OPTIMIZERS = {
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


# ---------------------------------------------------------------- the shared look-ahead (L2RW)


def _reference_l2rw_eps_grad(model, opt, x, y, vx, vy) -> torch.Tensor:
    """L2RW's eps-gradient written out as it was before the look-ahead was shared."""
    eps = torch.zeros(x.shape[0], dtype=x.dtype, requires_grad=True)
    fmodel = monkeypatch(model, copy_initial_weights=True)
    diffopt = get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    losses = F.cross_entropy(fmodel(x), y, reduction="none")
    diffopt.step((eps * losses).sum())
    return torch.autograd.grad(F.cross_entropy(fmodel(vx), vy), eps)[0]


@pytest.mark.parametrize("dtype", [torch.float32, DT])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_l2rw_step_is_unchanged_by_the_shared_lookahead(opt_name, dtype) -> None:
    """Seeded L2RW steps (BatchNorm, optimizer state): the eps-gradient, the example weights and
    the model gradient are bit-identical to the look-ahead written out inline."""
    x, y, vx, vy = small_batch(dtype)
    torch.manual_seed(0)
    model = SmallNet(bn=True).to(dtype)
    opt = OPTIMIZERS[opt_name](model.parameters())
    algo = L2RW(model)
    algo.attach_optimizer(opt)
    _warm(model, opt, x, y)
    for _ in range(2):
        expected = _reference_l2rw_eps_grad(model, opt, x, y, vx, vy)
        assert torch.equal(algo.eps_gradient(x, y, vx, vy), expected)
        w = torch.clamp(-expected, min=0.0)
        w = w / w.sum() if w.sum() > 0 else torch.zeros_like(w)
        grads = torch.autograd.grad(
            (w * F.cross_entropy(model(x), y, reduction="none")).sum(), list(model.parameters())
        )
        algo.meta_train_step(TaskBatch(x[None], y[None], vx[None], vy[None]))
        assert torch.equal(algo.last_weights, w)
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)
        opt.step()
        opt.zero_grad()


def test_lookahead_refuses_bad_rate_and_missing_optimizer() -> None:
    with pytest.raises(ValueError, match="algo.lookahead_lr must be > 0"):
        LookAhead(SmallNet(), lr=-1.0)
    x, y, vx, vy = small_batch()
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        LookAhead(SmallNet().to(DT))(lambda losses: losses * 0, x, y, vx, vy)


# ------------------------------------------------------------------ MWN's meta-gradient (float64)


def _mwn(opt_name: str, *, normalize: bool = True, bn: bool = False, **kw) -> MWN:
    x, y, _, _ = small_batch()
    torch.manual_seed(0)
    model = SmallNet(bn).to(DT)
    weight_net = WeightNet(hidden=5).to(DT)
    algo = MWN(model, weight_net=weight_net, normalize=normalize, **kw)
    opt = OPTIMIZERS[opt_name](model.parameters())
    algo.attach_optimizer(opt)
    _warm(model, opt, x, y)
    return algo


def _clean_loss_after_lookahead(algo: MWN, x, y, vx, vy) -> float:
    return float(algo.lookahead(algo.weigh, x, y, vx, vy).clean_loss.detach())


@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "mean"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_meta_gradient_matches_finite_differences(opt_name, normalize) -> None:
    """d (clean loss after the look-ahead) / d theta, theta the weight net's parameters, against
    central differences, with the classifier's optimizer state (momentum, Adam moments)."""
    algo = _mwn(opt_name, normalize=normalize)
    x, y, vx, vy = small_batch()
    grads, _ = algo.meta_gradient(x, y, vx, vy)
    h = 1e-6
    checked = 0
    for p, g in zip(algo.weight_net.parameters(), grads):
        flat, gflat = p.data.view(-1), g.reshape(-1)
        for i in range(0, flat.numel(), 2):
            orig = flat[i].item()
            flat[i] = orig + h
            up = _clean_loss_after_lookahead(algo, x, y, vx, vy)
            flat[i] = orig - h
            down = _clean_loss_after_lookahead(algo, x, y, vx, vy)
            flat[i] = orig
            # Absolute part: the difference's roundoff (abs=1e-10 failed by chance, issue 19).
            fd = CentralDifference(up, down, h)
            assert gflat[i].item() == fd.approx(rel=1e-5), (p.shape, i)
            checked += 1
    assert checked >= 10
    assert any(g.abs().sum() > 0 for g in grads)  # not vacuous


def test_meta_gradient_equals_a_hand_written_sgd_lookahead() -> None:
    """Plain SGD (lr a): theta' = theta - a * sum_i w_i(V) grad l_i with w = V(l) / sum V(l)
    written with torch.func.functional_call and autograd alone (no metarun.unroll)."""
    lr = 0.05
    x, y, vx, vy = small_batch()
    torch.manual_seed(0)
    model = SmallNet().to(DT)
    algo = MWN(model, weight_net=WeightNet(hidden=7).to(DT))
    algo.attach_optimizer(torch.optim.SGD(model.parameters(), lr=lr))
    grads, clean = algo.meta_gradient(x, y, vx, vy)

    v_params = list(algo.weight_net.parameters())
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    losses = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y, reduction="none")
    h = torch.relu(losses.detach()[:, None] @ v_params[0].T + v_params[1])
    v = torch.sigmoid(h @ v_params[2].T + v_params[3]).squeeze(1)
    w = v / v.sum()
    g = torch.autograd.grad((w * losses).sum(), list(params.values()), create_graph=True)
    ahead = {n: p - lr * gi for (n, p), gi in zip(params.items(), g)}
    val = F.cross_entropy(torch.func.functional_call(model, ahead, (vx,)), vy)
    expected = torch.autograd.grad(val, v_params)
    assert clean == pytest.approx(float(val.detach()), rel=1e-12)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_train_step_updates_the_weight_net_then_weights_the_real_step() -> None:
    """Algorithm 1: the weight net takes one step of its own optimizer on the meta-gradient;
    the real step's weights come from the UPDATED net, normalised, without a gradient into it;
    the model is touched only through .grad (its optimizer is the runner's)."""
    algo = _mwn("sgd_nesterov_wd", bn=True)
    x, y, vx, vy = small_batch()
    model = algo.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads, _ = algo.meta_gradient(x, y, vx, vy)
    # The expected weight-net step: a twin optimizer on a copy, fed the same gradient.
    twin = WeightNet(hidden=5).to(DT)
    twin.load_state_dict(algo.weight_net.state_dict())
    twin_opt = weight_net_optimizer(list(twin.parameters()))
    twin_opt.load_state_dict(algo.weight_optimizer.state_dict())
    for p, g in zip(twin.parameters(), grads):
        p.grad = g.clone()
    twin_opt.step()

    metrics = algo.meta_train_step(TaskBatch(x[None], y[None], vx[None], vy[None]))
    for a, b in zip(algo.weight_net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
        assert a.grad is None
    # BatchNorm running statistics moved by exactly one real forward (the look-ahead's are
    # private), weights unchanged.
    for k, v in model.state_dict().items():
        if "running" in k or "num_batches" in k:
            continue
        assert torch.equal(v, before[k]), k
    assert int(model.bn.num_batches_tracked) == int(before["bn.num_batches_tracked"]) + 1

    with torch.no_grad():
        model.bn.running_mean.copy_(before["bn.running_mean"])  # replay the same forward
        model.bn.running_var.copy_(before["bn.running_var"])
    losses = F.cross_entropy(model(x), y, reduction="none")
    v = twin(losses.detach())
    w = (v / v.sum()).detach()
    torch.testing.assert_close(algo.last_weights, w, rtol=1e-12, atol=0)
    expected = torch.autograd.grad((w * losses).sum(), list(model.parameters()))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-15)
    assert metrics["train/meta_loss"] == pytest.approx(float((w * losses).sum().detach()))
    assert metrics["weights/meta_grad_norm"] > 0


def test_unnormalised_weights_divide_by_the_batch_size() -> None:
    algo = _mwn("adam", normalize=False)
    x, y, vx, vy = small_batch()
    losses = F.cross_entropy(algo.model(x), y, reduction="none").detach()
    torch.testing.assert_close(algo.weigh(losses), algo.weight_net(losses) / 8)
    normalised = _mwn("adam")
    w = normalised.weigh(losses)
    assert float(w.sum()) == pytest.approx(1.0)


def test_weighting_function_and_curves() -> None:
    algo = _mwn("adam")
    losses, weights = algo.weighting_function()
    assert losses[0] == 0.0 and losses[-1] == 10.0 and losses.shape == weights.shape == (101,)
    assert ((weights > 0) & (weights < 1)).all()
    torch.testing.assert_close(weights, algo.weight_net(losses.to(DT)).detach())
    assert set(algo.log_curves()) == {"weights/function"}


def test_weight_net_optimizer_choices() -> None:
    net = WeightNet(3)
    sgd = weight_net_optimizer(list(net.parameters()), "sgd", lr=0.1, momentum=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    adam = weight_net_optimizer(list(net.parameters()), "adam", lr=0.01, weight_decay=0.0)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.01


# ------------------------------------------------------------------------------- through the runner


def _events(run_dir: Path) -> dict[str, set[str]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = acc.Tags()
    return {kind: set(tags[kind]) for kind in ("scalars", "images", "tensors")}


def test_mwn_run_logs_the_weighting_function_and_resumes_exactly(
    make_config, mnist_files, tmp_path
):
    def run(run_dir: Path, extra=()):
        args = ["algo=mwn", *MNIST_TINY, f"dataset.root={mnist_files}", *extra]
        return api.run(make_config(args), run_dir, overrides=args)

    summary = run(tmp_path / "once")
    assert summary.step == 4 and summary.results["test"]["num_examples"] == 10
    # The learned weighting function: CSV always, PNG and a TensorBoard figure with matplotlib.
    rows = (tmp_path / "once" / "curves" / "weights_function.csv").read_text().splitlines()
    assert rows[0] == "loss,weight" and len(rows) == 102
    assert all(0.0 < float(r.split(",")[1]) < 1.0 for r in rows[1:])
    assert (tmp_path / "once" / "curves" / "weights_function.png").stat().st_size > 1000
    events = _events(tmp_path / "once")
    assert "weights/function" in events["images"]
    assert {"weights/meta_grad_norm", "weights/lookahead_clean_loss", "train/meta_loss"} <= events[
        "scalars"
    ]
    records = read_metrics(tmp_path / "once")
    assert 0.0 <= records[0]["weights/minority_mass"] <= 1.0

    # Resume: 2 steps, then on to 4, gives the classifier, the weight net and its optimizer
    # state of 4 steps in one go.
    once, twice = run_and_resume(run, tmp_path)
    assert any(k.startswith("weight_net.") for k in once["algorithm"])
    for key, value in once["algorithm"].items():
        torch.testing.assert_close(value, twice["algorithm"][key], rtol=0, atol=1e-6)
    a, b = (c["algorithm_extra"]["weight_optimizer"]["state"] for c in (once, twice))
    assert a and a.keys() == b.keys()
    for i in a:
        torch.testing.assert_close(
            a[i]["momentum_buffer"], b[i]["momentum_buffer"], rtol=0, atol=1e-6
        )


def test_curves_without_matplotlib_fall_back_to_text_and_csv(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(run_logging, "_pyplot", lambda: None)
    curve = {"weights/function": (torch.linspace(0, 1, 5), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))}
    with caplog.at_level(logging.WARNING, logger="metarun.runner.logging"):
        with run_logging.RunLogger(tmp_path) as out:
            out.log_curves(1, curve)
            out.log_curves(2, curve)
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1
    rows = (tmp_path / "curves" / "weights_function.csv").read_text().splitlines()
    assert rows[0] == "loss,weight" and rows[-1] == "1.0,0.5"
    assert not (tmp_path / "curves" / "weights_function.png").exists()
    assert "weights/function/text_summary" in _events(tmp_path)["tensors"]  # the text table
    # A process that does not log (rank > 0) writes nothing.
    quiet = tmp_path / "quiet"
    run_logging.RunLogger(quiet, active=False).log_curves(1, curve)
    assert not quiet.exists()


def test_mwn_on_long_tailed_cifar_with_resnet32_one_step(make_config, tmp_path):
    root = tmp_path / "data"
    write_cifar(root, 10, per_class=12, pixels="marked")
    args = [
        "algo=mwn",
        "dataset=cifar10_lt",
        f"dataset.root={root}",
        "dataset.imbalance=10",
        "dataset.n_clean_per_class=2",
        "dataset.batch_size=4",
        "dataset.clean_batch_size=2",
        "outer_steps=1",
        "eval.every=0",
        "save.every=0",
        "log.progress=false",
        "log.tensorboard=false",
        "device=cpu",
    ]
    summary = api.run(make_config(args), tmp_path / "run", overrides=args)
    assert summary.step == 1 and summary.results["test"]["num_examples"] == 20
    assert (tmp_path / "run" / "curves" / "weights_function.csv").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algo.weight_net_lr=0", "algo.weight_net_lr must be > 0, got 0.0"),
        ("algo.weight_net_hidden=0", "algo.weight_net_hidden must be >= 1, got 0"),
        ("algo.weight_net_momentum=1.5", "algo.weight_net_momentum must be in [0, 1), got 1.5"),
        ("algo.lookahead_lr=-1", "algo.lookahead_lr must be > 0 or null"),
        ("meta_batch_size=2", "meta_batch_size must be 1 for algo=mwn"),
    ],
)
def test_bad_values_name_their_key(make_config, override, message):
    with pytest.raises(ConfigError) as error:
        make_config(["algo=mwn", "dataset=mnist_imbalance", override])
    assert message in str(error.value)


def test_presets_hold_the_papers_settings(make_config):
    lt = make_config(["experiment=cifar10_lt_mwn"])
    assert (lt.dataset.imbalance, lt.dataset.n_clean_per_class, lt.algo.weight_net_lr) == (
        100.0,
        10,
        1e-5,
    )
    assert type(lt.model).__name__ == "ResNet32Config" and lt.outer_steps == 12400
    noisy = make_config(["experiment=cifar10_noisy_mwn"])
    assert type(noisy.model).__name__ == "WRN28_10Config"
    assert (noisy.dataset.noise, noisy.dataset.noise_type.value, noisy.dataset.n_clean) == (
        0.4,
        "uniform",
        1000,
    )
    assert (noisy.outer_steps, noisy.meta_optimizer.milestones) == (20000, [18000, 19000])
    assert (noisy.meta_optimizer.weight_decay, noisy.algo.weight_net_lr) == (0.0005, 0.001)
    hundred = make_config(["experiment=cifar100_noisy_mwn"])
    assert hundred.dataset.num_classes == 100 and hundred.outer_steps == 20000
    assert make_config(["experiment=cifar100_lt_mwn"]).model.num_classes == 100


def test_data_parallel_keeps_one_weight_net_and_global_weights() -> None:
    """Two processes (threads with a summing all-reduce), each with half of the batch: the
    weight nets get the mean of the two meta-gradients, so they stay identical; the real step's
    weights sum to 1 over both halves; the model gradient is the local share (the runner
    averages it)."""
    from metarun.parallel import Shards

    x, y, vx, vy = small_batch()
    batch = TaskBatch(x[None], y[None], vx[None], vy[None])
    reduce = ThreadAllReduce(2)
    algos = [_mwn("sgd_nesterov_wd") for _ in range(2)]
    results: list[dict] = [{}, {}]

    def work(rank: int) -> None:
        algo = algos[rank]
        algo.set_shards(Shards(rank, 2, reduce.for_rank(rank)))
        local = slice(rank * 4, rank * 4 + 4), slice(rank * 3, rank * 3 + 3)
        results[rank]["grads"] = algo.meta_gradient(
            x[local[0]], y[local[0]], vx[local[1]], vy[local[1]]
        )[0]
        results[rank]["metrics"] = algo.meta_train_step(batch)

    run_in_threads(work)
    # The mean of the two shares' meta-gradients, the same in both processes.
    halves = [
        _mwn("sgd_nesterov_wd").meta_gradient(
            x[r * 4 : r * 4 + 4], y[r * 4 : r * 4 + 4], vx[r * 3 : r * 3 + 3], vy[r * 3 : r * 3 + 3]
        )[0]
        for r in range(2)
    ]
    for a, b, h0, h1 in zip(results[0]["grads"], results[1]["grads"], *halves):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, (h0 + h1) / 2, rtol=1e-12, atol=1e-15)
    for a, b in zip(algos[0].weight_net.parameters(), algos[1].weight_net.parameters()):
        assert torch.equal(a, b)
    total = float(algos[0].last_weights.sum() + algos[1].last_weights.sum())
    assert total == pytest.approx(1.0, rel=1e-12)


# ------------------------------------------------------------------------ acceptance (real data)

# The imbalanced-MNIST run of tests/test_runner_l2rw.py (MNIST test file, 758 training images at
# pos_ratio 0.995: 4 fours), with MWN's weight net moved by Adam at 3e-3 (scripts/mwn_mnist.py
# explains why). MWN needs more steps than L2RW here: its weights come from the loss alone, and
# the weight net first has to learn that a high loss means a minority example.
MWN_MNIST = [
    "algo.weight_net_optimizer=adam",
    "algo.weight_net_lr=0.003",
    "algo.weight_net_weight_decay=0",
]
# Measured (scripts/mwn_mnist.py, seed 0, the same runs): ERM 0.500, MWN 0.312.
MWN_MARGIN = 0.1


def test_mwn_learns_to_upweight_high_losses_on_imbalanced_mnist(real_mnist, make_config, tmp_path):
    """CI-sized (60 steps): on the 0.995 pool the learned weighting function increases with the
    loss (the minority 4s are the high-loss examples), the shape Shu et al. 2019 report for
    class imbalance (Fig. 1), and the minority gets more weight mass than its share of the
    pool."""
    args = [
        "algo=mwn",
        *MNIST_0995,
        *MWN_MNIST,
        "outer_steps=60",
        "log.every=60",
        f"dataset.root={real_mnist}",
    ]
    api.run(make_config(args), tmp_path, overrides=args)
    rows = (tmp_path / "curves" / "weights_function.csv").read_text().splitlines()[1:]
    weight = {round(float(a), 1): float(b) for a, b in (r.split(",") for r in rows)}
    # Measured: V(5) = 0.88, V(0.1) = 0.38 at step 60 (V(0) = 0.35, V(10) = 0.99).
    assert weight[5.0] > 1.5 * weight[0.1], weight
    mass = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # Plain training's expected minority mass is the minority's share of the pool, 4 / 758 =
    # 0.0053 (weights 1/B); measured here 0.0084, the mean over the 60 steps.
    assert mass["weights/minority_mass"] > 1.3 * 4 / 758, mass


@pytest.mark.slow
def test_mwn_beats_erm_on_imbalanced_mnist(real_mnist, make_config, tmp_path):
    errors = {}
    for algo, extra in (("erm", []), ("mwn", MWN_MNIST)):
        args = [
            f"algo={algo}",
            *MNIST_0995,
            *extra,
            "outer_steps=400",
            "log.every=100",
            f"dataset.root={real_mnist}",
        ]
        summary = api.run(make_config(args), tmp_path / algo, overrides=args)
        errors[algo] = summary.results["test"]["metrics"]["error"]["mean"]
    assert errors["erm"] - errors["mwn"] > MWN_MARGIN, errors
