"""Weights shared by reusing a module (golden vs torch.optim, gradient oracle, module untouched).

A module used twice (``proj`` at two positions of an ``nn.Sequential``) or held by two parents
has several names for one storage slot; ``named_parameters()`` lists it once. Tying by
assignment (``b.weight = a.weight``) is the other kind of tie and is checked alongside.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import central_difference
from torch import nn

import metarun.unroll as mu

DT = torch.float64


# float64 comparisons with torch.optim need its scalar state in float64 too.
pytestmark = pytest.mark.usefixtures("float64_default")


class _Wrap(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class TwoParents(nn.Module):
    """One ``nn.Linear`` held by two parent modules (``e1.f`` and ``e2.f``)."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = _Wrap(nn.Linear(4, 4))
        self.e2 = _Wrap(self.e1.f)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 2)
        return self.head(torch.tanh(self.e2(torch.tanh(self.e1(x)))))


class Assigned(nn.Module):
    """Two modules, one weight: ``b.weight = a.weight`` (biases stay separate)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _reused_in_sequential() -> nn.Module:
    proj = nn.Linear(4, 3)
    return nn.Sequential(
        proj, nn.ReLU(), nn.Linear(3, 4), nn.Sigmoid(), proj, nn.Tanh(), nn.Linear(3, 2)
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "sequential_reuse": _reused_in_sequential,
    "two_parents": TwoParents,
    "assigned": Assigned,
}

OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=0.01)),
    (torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    (torch.optim.Adagrad, dict(lr=0.1)),
    (torch.optim.Adamax, dict(lr=0.01)),
    (torch.optim.NAdam, dict(lr=0.01)),
    (torch.optim.RAdam, dict(lr=0.01)),
    (torch.optim.Adadelta, dict(lr=1.0)),
    (torch.optim.ASGD, dict(lr=0.05, t0=1.0)),
    (torch.optim.Rprop, dict(lr=0.01)),
]


def _opt_id(case: tuple) -> str:
    cls, kw = case
    return cls.__name__ + ("" if len(kw) == 1 else "-" + "-".join(f"{k}" for k in kw if k != "lr"))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().to(DT)


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, dtype=DT, generator=g) for _ in range(n)]


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out.sin() ** 2).sum() + out.pow(2).mean()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def test_reused_module_has_each_weight_once() -> None:
    model = _model("sequential_reuse")
    fm = mu.monkeypatch(model)
    assert fm.param_names == ["0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"]
    assert len(list(fm.parameters())) == len(list(model.parameters())) == 6


@pytest.mark.parametrize("case", OPTIMIZERS, ids=[_opt_id(c) for c in OPTIMIZERS])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fast_weights_match_torch_optim(kind: str, case: tuple) -> None:
    cls, kw = case
    model = _model(kind)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
    ref_model = copy.deepcopy(model)  # deepcopy keeps the ties
    ref_opt = cls(ref_model.parameters(), **kw)
    opt = cls(model.parameters(), **kw)
    with mu.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x in _batches(3):
            diffopt.step(_loss(fmodel(x)))
            ref_opt.zero_grad()
            _loss(ref_model(x)).backward()
            ref_opt.step()
        for fast, ref in zip(fmodel.parameters(), ref_model.parameters()):
            assert _rel_err(fast.detach(), ref.detach()) <= 1e-10
        x = _batches(4)[-1]
        torch.testing.assert_close(fmodel(x), ref_model(x), rtol=1e-10, atol=1e-12)
    # The user's module still holds its own leaf tensors, unchanged, under every name.
    for name, p in model.named_parameters(remove_duplicate=False):
        original, value = before[name]
        assert p is original and p.is_leaf and torch.equal(p, value), name


def _meta_loss(kind: str, case: tuple, model: nn.Module) -> tuple[torch.Tensor, list]:
    cls, kw = case
    xs = _batches(4)
    opt = cls(model.parameters(), **kw)
    with mu.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x in xs[:3]:
            diffopt.step(_loss(fmodel(x)))
        return _loss(fmodel(xs[3])), list(fmodel.parameters(time=0))


# Rprop's update is piecewise constant in the gradient (only its sign counts): second-order
# terms are exactly zero, so its meta-gradient is the identity path and FD agrees away from
# sign flips; it stays in the list for that reason.
@pytest.mark.parametrize("case", OPTIMIZERS, ids=[_opt_id(c) for c in OPTIMIZERS])
@pytest.mark.parametrize("kind", ["sequential_reuse", "two_parents"])
def test_meta_gradient_matches_finite_differences(kind: str, case: tuple) -> None:
    model = _model(kind)
    meta, _ = _meta_loss(kind, case, model)
    params = list(model.parameters())
    grads = torch.autograd.grad(meta, params)
    gen = torch.Generator().manual_seed(7)
    dirs = [torch.randn(p.shape, dtype=DT, generator=gen) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
    numeric = central_difference(lambda: _meta_loss(kind, case, model)[0], params, dirs)
    # The absolute part is the difference's roundoff (2e-9 |loss| at h=1e-6): abs=1e-9 was below.
    assert analytic == numeric.approx(rel=1e-6)
    # The shared weight on its own: its gradient sums the contributions of both uses.
    shared = params[0]
    d0 = torch.randn(shared.shape, dtype=DT, generator=gen)
    numeric0 = central_difference(lambda: _meta_loss(kind, case, model)[0], [shared], [d0])
    assert (grads[0] * d0).sum().item() == numeric0.approx(rel=1e-6)


def test_functional_call_refuses_two_values_for_one_tied_tensor() -> None:
    model = _model("sequential_reuse")
    w = model[0].weight
    params = {"0.weight": w.detach().clone(), "4.weight": w.detach().clone() + 1}
    with pytest.raises(ValueError, match=r"'0\.weight' and '4\.weight'.*same \(tied\) tensor"):
        mu.functional_call(model, params, torch.zeros(2, 4, dtype=DT))
    # The same tensor under both names is fine.
    same = w.detach().clone()
    out = mu.functional_call(
        model, {"0.weight": same, "4.weight": same}, torch.zeros(2, 4, dtype=DT)
    )
    assert out.shape == (2, 2)


def test_reused_batchnorm_buffers_stay_private() -> None:
    """A reused BatchNorm: its one set of running statistics is updated once per use, as in
    the plain module, and the module's own buffers are untouched (private policy)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Tanh(), bn).to(DT)
    ref = copy.deepcopy(model)
    original = {n: b.clone() for n, b in model.named_buffers()}
    fm = mu.monkeypatch(model)
    x = _batches(1)[0]
    torch.testing.assert_close(fm(x), ref(x))
    for name, b in ref.named_buffers():
        torch.testing.assert_close(fm.buffers()[name], b)
        assert torch.equal(dict(model.named_buffers())[name], original[name])
    assert int(fm.buffers()["1.num_batches_tracked"]) == 2
