"""Gradient oracles: meta-gradients of unrolled inner loops against float64 finite differences."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import CentralDifference, central_difference
from torch import nn

import metarun.unroll as mu

DT = torch.float64


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 4, 4)
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 2)
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "mlp":
        x = torch.randn(6, 3, dtype=DT, generator=g)
    elif kind == "conv":
        x = torch.randn(6, 1, 4, 4, dtype=DT, generator=g)
    else:
        x = torch.randn(6, 3, 2, dtype=DT, generator=g)
    y = torch.randint(0, 2, (6,), generator=g)
    return x, y


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        m: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    elif kind == "conv":
        m = ConvBN()
    else:
        m = LSTMNet()
    return m.to(DT)


OPTS: dict[str, tuple[type, dict, Callable[[], dict]]] = {
    "sgd_momentum": (
        torch.optim.SGD,
        dict(lr=0.2, momentum=0.6),
        lambda: {
            "lr": [torch.tensor(0.2, dtype=DT, requires_grad=True)],
            "momentum": [torch.tensor(0.6, dtype=DT, requires_grad=True)],
        },
    ),
    "adam": (
        torch.optim.Adam,
        dict(lr=0.05),
        lambda: {
            "lr": [torch.tensor(0.05, dtype=DT, requires_grad=True)],
            "betas": [
                (
                    torch.tensor(0.8, dtype=DT, requires_grad=True),
                    torch.tensor(0.9, dtype=DT, requires_grad=True),
                )
            ],
        },
    ),
}


def _hyper_tensors(override: dict) -> list[torch.Tensor]:
    out = []
    for values in override.values():
        v = values[0]
        out.extend(v if isinstance(v, tuple) else [v])
    return out


def _meta_loss(kind: str, opt_name: str, copy: bool, model: nn.Module, override: dict):
    """Meta-loss after 3 inner steps, through the higher-compatible API."""
    cls, kw, _ = OPTS[opt_name]
    x, y = _data(kind)
    opt = cls(model.parameters(), **kw)
    with mu.innerloop_ctx(model, opt, copy_initial_weights=copy, override=override) as (fm, do):
        for _ in range(3):
            do.step(F.cross_entropy(fm(x[:4]), y[:4]))
        meta = F.cross_entropy(fm(x[2:]), y[2:])
        p0 = list(fm.parameters(time=0))
    return meta, p0


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "nocopy"])
@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("kind", ["mlp", "conv", "lstm"])
def test_meta_gradient_matches_finite_differences(kind: str, opt_name: str, copy: bool) -> None:
    model = _model(kind)
    override = OPTS[opt_name][2]()
    hyper = _hyper_tensors(override)
    meta, p0 = _meta_loss(kind, opt_name, copy, model, override)
    wrt = p0 if copy else list(model.parameters())
    grads = torch.autograd.grad(meta, wrt + hyper)
    if copy:
        # copy_initial_weights=True: nothing reaches the module's own parameters.
        assert all(p.grad is None for p in model.parameters())

    gen = torch.Generator().manual_seed(7)
    # Perturbing the module's parameters moves the time-0 copies in both modes.
    targets = list(model.parameters()) + hyper
    dirs = [torch.randn(t.shape, dtype=DT, generator=gen) for t in targets]
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
    numeric = central_difference(
        lambda: _meta_loss(kind, opt_name, copy, model, override)[0], targets, dirs
    )
    # The absolute part is the difference's roundoff (2e-9 |loss| at h=1e-6): abs=1e-9 was below.
    assert analytic == numeric.approx(rel=1e-6)

    # Each hyperparameter on its own, so a wrong-but-small hypergradient cannot hide.
    for i, h in enumerate(hyper):
        g_h = grads[len(wrt) + i].item()
        num_h = central_difference(
            lambda: _meta_loss(kind, opt_name, copy, model, override)[0],
            [h],
            [torch.ones((), dtype=DT)],
        )
        assert g_h == num_h.approx(rel=1e-5)


def _toy(copy: bool, w0: float = 0.7):
    model = nn.Linear(1, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.fill_(w0)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    mom = torch.tensor(0.5, dtype=DT, requires_grad=True)
    x = torch.tensor([[1.0], [2.0]], dtype=DT)
    y = torch.tensor([[2.0], [3.0]], dtype=DT)
    with mu.innerloop_ctx(
        model, opt, copy_initial_weights=copy, override={"lr": [lr], "momentum": [mom]}
    ) as (fm, do):
        for _ in range(5):
            do.step(F.mse_loss(fm(x), y))
        meta = F.mse_loss(fm(x), y)
    return model, meta, lr, mom


def test_toy_case_copy_initial_weights() -> None:
    model, meta, lr, mom = _toy(copy=True)
    meta.backward()
    assert model.weight.grad is None
    assert lr.grad is not None and mom.grad is not None

    model, meta, lr, mom = _toy(copy=False)
    meta.backward()
    assert model.weight.grad is not None
    eps = 1e-6
    fd = CentralDifference(_toy(False, 0.7 + eps)[1].item(), _toy(False, 0.7 - eps)[1].item(), eps)
    assert model.weight.grad.item() == fd.approx(rel=1e-7)
    assert model.weight.grad.item() != 0.0


def test_per_parameter_learning_rates_functional_api() -> None:
    """Meta-SGD: one learnable lr tensor per parameter (elementwise), via the dict layer."""
    model = _model("mlp")
    x, y = _data("mlp")
    lrs = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}

    def meta() -> torch.Tensor:
        params = mu.get_params(model)
        loss_fn = lambda p: F.cross_entropy(mu.functional_call(model, p, x[:4]), y[:4])  # noqa: E731
        res = mu.inner_loop(loss_fn, params, mu.SGD(), 3, hyper={"lr": lrs})
        return F.cross_entropy(mu.functional_call(model, res.params, x[2:]), y[2:])

    loss = meta()
    names = list(lrs)
    grads = torch.autograd.grad(loss, [lrs[n] for n in names] + list(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    targets = [lrs[n] for n in names] + list(model.parameters())
    dirs = [torch.randn(t.shape, dtype=DT, generator=gen) for t in targets]
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
    assert analytic == central_difference(meta, targets, dirs).approx(rel=1e-6)
    # Different lrs per parameter give different adapted weights than one shared lr.
    assert not torch.allclose(grads[0], grads[0].mean().expand_as(grads[0]))


def test_functional_inner_loop_equals_facade() -> None:
    model = _model("conv")
    x, y = _data("conv")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with mu.innerloop_ctx(model, opt, copy_initial_weights=False, buffer_policy="batch_stats") as (
        fm,
        do,
    ):
        for _ in range(3):
            do.step(F.cross_entropy(fm(x), y))
        a = F.cross_entropy(fm(x), y)
    ga = torch.autograd.grad(a, list(model.parameters()))

    fopt = mu.SGD(lr=0.1, momentum=0.9)

    def loss_fn(p):
        return F.cross_entropy(mu.functional_call(model, p, x), y)

    res = mu.inner_loop(loss_fn, mu.get_params(model), fopt, 3)
    b = loss_fn(res.params)
    gb = torch.autograd.grad(b, list(model.parameters()))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    assert len(res.losses) == 3


def test_first_order_keeps_identity_path() -> None:
    """FOMAML: meta-gradient = query-loss gradient at the adapted weights (SGD, no momentum)."""
    model = _model("mlp")
    x, y = _data("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with mu.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True) as (fm, do):
        for _ in range(3):
            do.step(F.cross_entropy(fm(x[:4]), y[:4]))
        adapted = [p.detach().requires_grad_() for p in fm.fast_params]
        meta = F.cross_entropy(fm(x[2:]), y[2:])
    meta.backward()
    expected = torch.autograd.grad(
        F.cross_entropy(
            torch.func.functional_call(model, dict(zip(fm.param_names, adapted)), (x[2:],)), y[2:]
        ),
        adapted,
    )
    for p, e in zip(model.parameters(), expected):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)

    # The functional layer agrees, and differs from the second-order gradient.
    def loss_fn(p):
        return F.cross_entropy(mu.functional_call(model, p, x[:4]), y[:4])

    fo = mu.inner_loop(loss_fn, mu.get_params(model), mu.SGD(lr=0.5), 3, first_order=True)
    so = mu.inner_loop(loss_fn, mu.get_params(model), mu.SGD(lr=0.5), 3)
    g_fo = torch.autograd.grad(
        F.cross_entropy(mu.functional_call(model, fo.params, x[2:]), y[2:]),
        list(model.parameters()),
    )
    g_so = torch.autograd.grad(
        F.cross_entropy(mu.functional_call(model, so.params, x[2:]), y[2:]),
        list(model.parameters()),
    )
    for u, e in zip(g_fo, expected):
        torch.testing.assert_close(u, e, rtol=1e-10, atol=1e-12)
    assert any((u - v).abs().max() > 1e-6 for u, v in zip(g_fo, g_so))


def test_truncation_and_checkpointing() -> None:
    model = _model("mlp")
    x, y = _data("mlp")

    def loss_fn(p):
        return F.cross_entropy(mu.functional_call(model, p, x[:4]), y[:4])

    def grads(**kw):
        res = mu.inner_loop(loss_fn, mu.get_params(model), mu.SGD(lr=0.5, momentum=0.3), 4, **kw)
        q = F.cross_entropy(mu.functional_call(model, res.params, x[2:]), y[2:])
        return torch.autograd.grad(q, list(model.parameters()))

    full, fo = grads(), grads(first_order=True)
    for a, b in zip(grads(truncate=4), full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(truncate=0), fo):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    mid = grads(truncate=2)
    assert any((a - b).abs().max() > 1e-8 for a, b in zip(mid, full))
    assert any((a - b).abs().max() > 1e-8 for a, b in zip(mid, fo))
    for a, b in zip(grads(checkpoint=True), full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_test_mode_inner_loop_matches_tracked_values() -> None:
    """track_higher_grads=False must take every step (not just the first) and build no graph."""
    model = _model("mlp")
    x, y = _data("mlp")

    def loss_fn(p):
        return F.cross_entropy(mu.functional_call(model, p, x), y)

    opt = mu.Adam(lr=0.05)
    tracked = mu.inner_loop(loss_fn, mu.get_params(model, copy=True), opt, 4)
    untracked = mu.inner_loop(
        loss_fn, mu.get_params(model, copy=True), opt, 4, track_higher_grads=False
    )
    assert len({round(v.item(), 12) for v in untracked.losses}) == 4  # every step moved
    for n, p in untracked.params.items():
        assert p.grad_fn is None and p.requires_grad
        torch.testing.assert_close(p, tracked.params[n].detach(), rtol=1e-12, atol=1e-14)
