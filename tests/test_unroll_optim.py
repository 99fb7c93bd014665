"""Golden tests: the differentiable optimizers reproduce the installed torch.optim in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metarun.unroll as mu

# float64 comparisons with torch.optim need its scalar state in float64 too.
pytestmark = pytest.mark.usefixtures("float64_default")


CASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.5, maximize=True)),
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True)),
    (torch.optim.Adam, dict(lr=0.01, maximize=True)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (torch.optim.RMSprop, dict(lr=0.01)),
    (torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.1)),
    (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, alpha=0.9)),
    (torch.optim.Adagrad, dict(lr=0.1)),
    (
        torch.optim.Adagrad,
        dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.2),
    ),
    (torch.optim.Adamax, dict(lr=0.01)),
    (torch.optim.Adamax, dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.95))),
    (torch.optim.NAdam, dict(lr=0.01)),
    (torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, momentum_decay=0.01)),
    (torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.RAdam, dict(lr=0.01)),
    (torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.Adadelta, dict(lr=1.0)),
    (torch.optim.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1, maximize=True)),
    (torch.optim.ASGD, dict(lr=0.05)),
    # t0=2 and a large lambd: the averaging branch (mu < 1) and the eta decay both take part.
    (torch.optim.ASGD, dict(lr=0.05, lambd=0.5, alpha=0.6, t0=2.0, weight_decay=0.1)),
    (torch.optim.Rprop, dict(lr=0.01)),
    # Narrow step-size bounds so that clamping happens within the 10 steps.
    (torch.optim.Rprop, dict(lr=0.01, etas=(0.3, 1.5), step_sizes=(1e-3, 0.02), maximize=True)),
]


def _ids(case: tuple) -> str:
    cls, kw = case
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (out.sin() ** 2).sum() + out.pow(2).mean()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("pre_steps", [0, 3], ids=["fresh", "prestepped"])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_matches_torch_optim(case: tuple, pre_steps: int) -> None:
    cls, kw = case
    model = _model()
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # Two param groups with different lrs so group handling is exercised too.
    lin1, lin2 = model[0], model[2]
    groups = [
        {"params": list(lin1.parameters())},
        {"params": list(lin2.parameters()), "lr": kw["lr"] * 0.5},
    ]
    opt = cls(groups, **kw)
    for _ in range(pre_steps):
        opt.zero_grad()
        _loss(model(x), x).backward()
        opt.step()

    # Reference trajectory on a deep copy of model and optimizer.
    ref_model = _model()
    ref_model.load_state_dict(model.state_dict())
    ref_groups = [
        {"params": list(ref_model[0].parameters())},
        {"params": list(ref_model[2].parameters()), "lr": kw["lr"] * 0.5},
    ]
    ref_opt = cls(ref_groups, **kw)
    ref_opt.load_state_dict(opt.state_dict())

    with mu.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(10):
            diffopt.step(_loss(fmodel(x), x))
            ref_opt.zero_grad()
            _loss(ref_model(x), x).backward()
            ref_opt.step()
        for fast, ref in zip(fmodel.parameters(), ref_model.parameters()):
            assert _rel_err(fast.detach(), ref.detach()) <= 1e-10
        # The state too (e.g. ASGD's average ax, which never feeds back into the weights).
        compared = 0
        for i, ref in enumerate(ref_model.parameters()):
            for key, value in ref_opt.state[ref].items():
                ours = diffopt.state[i].get(key)
                if torch.is_tensor(value) and value.shape == ref.shape and ours is not None:
                    assert _rel_err(ours.detach(), value) <= 1e-10, key
                    compared += 1
        assert compared > 0 or cls is torch.optim.SGD and "momentum" not in kw


@pytest.mark.parametrize("case", CASES[::3], ids=[_ids(c) for c in CASES[::3]])
def test_functional_step_matches_torch_optim(case: tuple) -> None:
    """The pure (params, grads, state, hyper) -> (params, state) API, one group."""
    cls, kw = case
    model = _model()
    x = torch.randn(7, 3, dtype=torch.float64)
    fopt = mu.functional_for(cls)(**kw)
    params = mu.get_params(model, copy=True)
    state = fopt.init(params)
    ref = cls(model.parameters(), **kw)
    for _ in range(10):
        loss = _loss(mu.functional_call(model, params, x), x)
        grads = mu.grads_of(loss, params, create_graph=False)
        params, state = fopt.step(params, grads, state)
        ref.zero_grad()
        _loss(model(x), x).backward()
        ref.step()
    for name, p in model.named_parameters():
        assert _rel_err(params[name].detach(), p.detach()) <= 1e-10


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
        (torch.optim.AdamW, dict(lr=0.01)),
        (torch.optim.RMSprop, dict(lr=0.01, centered=True)),
        (torch.optim.Adagrad, dict(lr=0.1)),
        (torch.optim.NAdam, dict(lr=0.01)),
        (torch.optim.RAdam, dict(lr=0.01)),
        (torch.optim.Adamax, dict(lr=0.01)),
        (torch.optim.Adadelta, dict(lr=1.0)),
        (torch.optim.ASGD, dict(lr=0.01, t0=1.0)),
        (torch.optim.Rprop, dict(lr=0.01)),
    ],
)
def test_zero_second_moment_gives_finite_hypergradients(cls: type, kw: dict) -> None:
    """A parameter with exactly zero gradient has zero second moment; sqrt'(0) must not NaN."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    model.register_parameter("at_zero", nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    x = torch.randn(5, 3, dtype=torch.float64)
    lr = torch.tensor(kw["lr"], dtype=torch.float64, requires_grad=True)
    opt = cls(model.parameters(), **kw)
    with torch.autograd.detect_anomaly():
        with mu.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (
            fmodel,
            diffopt,
        ):
            for _ in range(3):
                out = fmodel(x)
                # p**2 at p == 0: the gradient 2p is exactly zero yet part of the graph, so the
                # second moment is an exact zero that the hypergradient differentiates through.
                fast_zero = fmodel.fast_params[2]
                diffopt.step(out.pow(2).mean() + fast_zero.pow(2).sum())
            meta = fmodel(x).pow(2).mean() + fmodel.fast_params[2].sum()
            meta.backward()
    assert torch.isfinite(lr.grad).all()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_safe_sqrt_gradient_at_zero() -> None:
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    y = mu.safe_sqrt(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0]
    assert x.grad.tolist() == [0.0, 0.25]
