"""L2RW: the eps-gradient (float64 finite differences and a closed form), weight normalisation,
and a look-ahead that leaves the model and its optimizer untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CentralDifference, SmallNet, ThreadAllReduce, run_in_threads, small_batch

from metarun.algorithms.l2rw import ERM, L2RW, Shards, normalise_weights
from metarun.tasks import TaskBatch

DT = torch.float64


def _algo(opt_fn, bn: bool = False, **kw) -> L2RW:
    torch.manual_seed(0)
    model = SmallNet(bn).to(DT)
    algo = L2RW(model, **kw)
    algo.attach_optimizer(opt_fn(model.parameters()))
    return algo


@pytest.mark.parametrize(
    "opt_fn",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_eps_gradient_matches_finite_differences(opt_fn) -> None:
    algo = _algo(opt_fn)
    x, y, vx, vy = small_batch()
    # Give the optimizer some state first so the look-ahead starts from it.
    F.cross_entropy(algo.model(x), y).backward()
    algo.optimizer.step()
    algo.optimizer.zero_grad()
    grad = algo.eps_gradient(x, y, vx, vy)
    h = 1e-6
    for i in range(0, 8, 3):
        e = torch.zeros(8, dtype=DT)
        e[i] = h
        up = algo._lookahead_val_loss(e, x, y, vx, vy)[0].item()
        down = algo._lookahead_val_loss(-e, x, y, vx, vy)[0].item()
        # The absolute part is the roundoff of the difference (was abs=1e-12, below it).
        assert grad[i].item() == CentralDifference(up, down, h).approx(rel=1e-6)


def test_eps_gradient_closed_form_for_plain_sgd() -> None:
    """One SGD step: d L_val / d eps_i = -lr * grad L_val(theta) . grad l_i(theta)."""
    lr = 0.05
    algo = _algo(lambda p: torch.optim.SGD(p, lr=lr))
    x, y, vx, vy = small_batch()
    params = list(algo.model.parameters())
    g_val = torch.autograd.grad(F.cross_entropy(algo.model(vx), vy), params)
    expected = []
    for i in range(8):
        g_i = torch.autograd.grad(F.cross_entropy(algo.model(x[i : i + 1]), y[i : i + 1]), params)
        expected.append(-lr * sum((a * b).sum() for a, b in zip(g_val, g_i)))
    torch.testing.assert_close(algo.eps_gradient(x, y, vx, vy), torch.stack(expected))
    # lookahead_lr overrides the optimizer's learning rate.
    algo.lookahead_lr = 2 * lr
    torch.testing.assert_close(algo.eps_gradient(x, y, vx, vy), 2 * torch.stack(expected))


def test_normalise_weights_edge_cases() -> None:
    w = normalise_weights(torch.tensor([-2.0, 1.0, -6.0, 0.0]))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.0, 0.75, 0.0]))
    assert normalise_weights(torch.tensor([1.0, 0.0, 3.0])).eq(0).all()  # nothing helps
    assert normalise_weights(torch.zeros(3)).eq(0).all()
    w = normalise_weights(torch.tensor([-1e-30, 5.0]))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0]))


def test_lookahead_leaves_model_buffers_and_optimizer_untouched() -> None:
    algo = _algo(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), bn=True)
    x, y, vx, vy = small_batch()
    F.cross_entropy(algo.model(x), y).backward()
    algo.optimizer.step()
    algo.optimizer.zero_grad()
    state = {k: v.clone() for k, v in algo.model.state_dict().items()}
    opt_state = [
        algo.optimizer.state[p]["momentum_buffer"].clone() for p in algo.model.parameters()
    ]
    algo.example_weights(x, y, vx, vy)
    for k, v in algo.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, b in zip(algo.model.parameters(), opt_state):
        assert torch.equal(algo.optimizer.state[p]["momentum_buffer"], b)
        assert p.grad is None


def test_train_step_uses_weights_and_erm_is_uniform() -> None:
    x, y, vx, vy = small_batch()
    batch = TaskBatch(x[None], y[None], vx[None], vy[None], support_info=y[None].clone())
    algo = _algo(lambda p: torch.optim.SGD(p, lr=0.1))
    w = algo.example_weights(x, y, vx, vy)
    metrics = algo.meta_train_step(batch)
    expected = torch.autograd.grad(
        (w * F.cross_entropy(algo.model(x), y, reduction="none")).sum(),
        list(algo.model.parameters()),
    )
    for p, e in zip(algo.model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    assert metrics["weights/flipped_mass"] == 0.0  # support_info == labels: nothing flipped
    assert 0.0 <= metrics["weights/zero_fraction"] <= 1.0
    assert "weights/eps_grad_norm" in metrics

    erm = ERM(SmallNet().to(DT), minority_class=1)
    erm.meta_train_step(batch)
    torch.testing.assert_close(erm.last_weights, torch.full((8,), 1 / 8, dtype=DT))
    assert erm.evaluate(batch)["post/accuracy"].shape == (6,)


def test_needs_optimizer_and_valid_lookahead_lr() -> None:
    with pytest.raises(ValueError, match="algo.lookahead_lr must be > 0"):
        L2RW(SmallNet(), lookahead_lr=0.0)
    algo = L2RW(SmallNet().to(DT))
    x, y, vx, vy = small_batch()
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        algo.eps_gradient(x, y, vx, vy)


def test_lookahead_takes_the_optimizers_current_rate() -> None:
    """A learning-rate schedule changes ``param_groups[...]["lr"]`` between steps; the look-ahead
    must step with that rate. A fresh SGD step is linear in the rate, so halving the rate halves
    the eps-gradient (-lr * <grad clean loss, grad loss_i>)."""
    algo = _algo(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    x, y, vx, vy = small_batch()
    full = algo.eps_gradient(x, y, vx, vy)
    from metarun.config import MetaOptimizerConfig, ScheduleName
    from metarun.runner.build import LRSchedule

    config = MetaOptimizerConfig(lr=0.1, schedule=ScheduleName.step, milestones=[3])
    schedule = LRSchedule(config, 10)
    schedule.apply(algo.optimizer, 3)
    assert algo.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    torch.testing.assert_close(algo.eps_gradient(x, y, vx, vy), full / 10, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["l2rw", "erm"])
def test_data_parallel_step_equals_the_whole_batch_step(kind: str) -> None:
    """Two processes, each with half of the training and clean examples, then the runner's
    gradient and metric averaging: the single-process step on the whole batch (float64)."""
    x, y, vx, vy = small_batch()
    flipped = y.clone()
    flipped[::3] = (flipped[::3] + 1) % 3
    batch = TaskBatch(x[None], y[None], vx[None], vy[None], support_info=flipped[None])

    def make():
        opt = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
        if kind == "erm":
            torch.manual_seed(0)
            algo = ERM(SmallNet().to(DT), minority_class=1)
            algo.attach_optimizer(opt(algo.model.parameters()))
            return algo
        algo = _algo(opt, minority_class=1)
        # Some optimizer state first, as mid-training.
        F.cross_entropy(algo.model(x), y).backward()
        algo.optimizer.step()
        algo.optimizer.zero_grad()
        return algo

    whole = make()
    expected = whole.meta_train_step(batch)
    reduce = ThreadAllReduce(2)
    ranks = [make() for _ in range(2)]
    for rank, algo in enumerate(ranks):
        algo.set_shards(Shards(rank, 2, reduce.for_rank(rank)))
    results: list[dict[str, float]] = [{}, {}]

    def step(rank: int) -> None:
        results[rank] = ranks[rank].meta_train_step(batch)

    run_in_threads(step)
    assert all(results), "a rank failed"
    for p, a, b in zip(whole.model.parameters(), *(r.model.parameters() for r in ranks)):
        torch.testing.assert_close((a.grad + b.grad) / 2, p.grad, rtol=1e-10, atol=1e-14)
    for key, value in expected.items():  # equal shares: the mean of means is the mean
        mean = (float(results[0][key]) + float(results[1][key])) / 2
        assert mean == pytest.approx(float(value), rel=1e-10), key
    torch.testing.assert_close(
        torch.cat([r.last_weights for r in ranks]), whole.last_weights, rtol=1e-10, atol=1e-14
    )
