"""higher API that metarun.unroll provides for drop-in use: tensor overrides, trainable
optimizer hyperparameters, ``higher.utils`` and ``make_functional`` (asserting values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CentralDifference
from torch import nn

import metarun.unroll as mu
from metarun.unroll import utils

DT = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, dtype=DT, generator=g), torch.randn(8, 2, dtype=DT, generator=g)


def _two_groups(model: nn.Module, cls: type = torch.optim.SGD, **kw) -> torch.optim.Optimizer:
    return cls(
        [
            {"params": list(model[0].parameters()), "lr": 0.2},
            {"params": list(model[2].parameters())},
        ],
        lr=0.1,
        **kw,
    )


def _sgd_by_hand(model: nn.Module, lrs: list[float], steps: int = 3) -> list[torch.Tensor]:
    """Plain SGD with one lr per layer, written out: the reference for the override tests."""
    x, y = _xy()
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    for _ in range(steps):
        loss = F.mse_loss(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params)
        params = [
            (p - (lrs[0] if i < 2 else lrs[1]) * g).detach().requires_grad_()
            for i, (p, g) in enumerate(zip(params, grads))
        ]
    return params


def _run(model: nn.Module, override, steps: int = 3) -> list[torch.Tensor]:
    x, y = _xy()
    opt = _two_groups(model)
    with mu.innerloop_ctx(model, opt, override=override) as (fm, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fm(x), y))
        return list(fm.parameters())


# -- override values ------------------------------------------------------------------------
def test_one_element_tensor_override_is_one_value_for_all_groups() -> None:
    model = _model()
    lr = torch.tensor([0.05], dtype=DT, requires_grad=True)
    fast = _run(model, {"lr": lr})
    for got, want in zip(fast, _sgd_by_hand(model, [0.05, 0.05])):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)
    # ... and it stays in the graph: the hypergradient reaches the 1-element tensor.
    (g,) = torch.autograd.grad(sum(p.sum() for p in fast), [lr])
    assert g.shape == (1,) and g.abs().item() > 0


def test_per_group_tensor_overrides() -> None:
    model = _model()
    as_list = _run(model, {"lr": [torch.tensor(0.05, dtype=DT), torch.tensor(0.3, dtype=DT)]})
    as_tensor = _run(model, {"lr": torch.tensor([0.05, 0.3], dtype=DT)})
    for a, b, want in zip(as_list, as_tensor, _sgd_by_hand(model, [0.05, 0.3])):
        torch.testing.assert_close(a.detach(), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), want, rtol=1e-12, atol=1e-14)


def test_step_override_takes_precedence() -> None:
    model = _model()
    x, y = _xy()
    opt = _two_groups(model)
    with mu.innerloop_ctx(model, opt, override={"lr": [0.9]}) as (fm, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fm(x), y), override={"lr": (0.05, 0.3)})
        fast = list(fm.parameters())
    for got, want in zip(fast, _sgd_by_hand(model, [0.05, 0.3])):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "values,match",
    [
        (
            [0.1, 0.2, 0.3],
            r"override\['lr'\] has 3 values but the optimizer has 2 param group\(s\)",
        ),
        (
            torch.tensor([0.1, 0.2, 0.3]),
            r"override\['lr'\] has 3 values but the optimizer has 2 param group\(s\)",
        ),
        (torch.tensor(0.1), r"override\['lr'\] must be a sequence.*got Tensor"),
        (0.1, r"override\['lr'\] must be a sequence.*got float"),
        ("0.1", r"override\['lr'\] must be a sequence.*got str"),
    ],
    ids=["list3", "tensor3", "0d-tensor", "float", "str"],
)
def test_wrong_override_values_are_refused_clearly(values, match: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=match):
        mu.get_diff_optim(_two_groups(model), model.parameters(), override={"lr": values})


# -- trainable optimizer hyperparameters ----------------------------------------------------
def test_get_trainable_opt_params() -> None:
    model = _model()
    opt = _two_groups(model, torch.optim.Adam, betas=(0.8, 0.9))
    hp = mu.get_trainable_opt_params(opt)
    # Flags (amsgrad, maximize, foreach, ...) are switches, not hyperparameters.
    assert sorted(hp) == ["betas", "eps", "lr", "weight_decay"]
    assert [t.item() for t in hp["lr"]] == [0.2, 0.1]
    assert all(isinstance(b, tuple) and len(b) == 2 for b in hp["betas"])
    leaves = utils.flatten(hp)
    assert len(leaves) == 2 * (1 + 2 + 1 + 1)
    assert all(t.is_leaf and t.requires_grad and t.dtype == DT for t in leaves)


def test_get_apply_round_trip_keeps_types() -> None:
    model = _model()
    opt = _two_groups(model, torch.optim.Adam, betas=(0.8, 0.9))
    hp = mu.get_trainable_opt_params(opt)
    other = _two_groups(model, torch.optim.Adam)
    other.param_groups[0]["lr"] = 5.0
    mu.apply_trainable_opt_params(other, hp)
    for mine, theirs in zip(opt.param_groups, other.param_groups):
        for key, value in mine.items():
            if key != "params":
                assert type(theirs[key]) is type(value) and theirs[key] == value, key
    # A tensor setting is written in place; an int stays an int.
    lr_tensor = torch.tensor(0.3)
    opt2 = torch.optim.SGD(model.parameters(), lr=lr_tensor)
    opt2.param_groups[0]["an_int"] = 3
    mu.apply_trainable_opt_params(opt2, {"lr": [torch.tensor(0.7)], "an_int": [torch.tensor(4.0)]})
    assert opt2.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.7)
    assert opt2.param_groups[0]["an_int"] == 4 and type(opt2.param_groups[0]["an_int"]) is int


def test_apply_refuses_bad_values() -> None:
    model = _model()
    opt = _two_groups(model, torch.optim.Adam)
    with pytest.raises(ValueError, match=r"override\['lr'\] has 3 values.*2 param group"):
        mu.apply_trainable_opt_params(opt, {"lr": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"betas \(group 0\).*sequence of 2 values"):
        mu.apply_trainable_opt_params(opt, {"betas": [torch.tensor(0.5)]})
    with pytest.raises(ValueError, match=r"has no setting 'rho'"):
        mu.apply_trainable_opt_params(opt, {"rho": [0.5]})
    with pytest.raises(ValueError, match=r"amsgrad \(group 0\) is False, not a number"):
        mu.apply_trainable_opt_params(opt, {"amsgrad": [torch.tensor(1.0)]})


def _meta_loss(model: nn.Module, hp: dict, query: slice = slice(4, None)) -> torch.Tensor:
    x, y = _xy()
    opt = _two_groups(model, torch.optim.SGD, momentum=0.5)
    with mu.innerloop_ctx(model, opt, override=hp) as (fm, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fm(x[:4]), y[:4]))
        return F.mse_loss(fm(x[query]), y[query])


def test_hypergradient_of_trainable_params_matches_finite_differences() -> None:
    model = _model()
    hp = mu.get_trainable_opt_params(_two_groups(model, torch.optim.SGD, momentum=0.5))
    lrs = hp["lr"]
    grads = torch.autograd.grad(_meta_loss(model, hp), lrs)
    eps = 1e-6
    for lr, g in zip(lrs, grads):
        with torch.no_grad():
            lr.add_(eps)
        up = _meta_loss(model, hp).item()
        with torch.no_grad():
            lr.sub_(2 * eps)
        down = _meta_loss(model, hp).item()
        with torch.no_grad():
            lr.add_(eps)
        # Absolute part: the difference's roundoff (2e-9 |loss| at h=1e-6); abs=1e-10 was below.
        assert g.item() == CentralDifference(up, down, eps).approx(rel=1e-6)


def test_learning_an_lr_through_trainable_params() -> None:
    model = _model()
    opt = _two_groups(model, torch.optim.SGD, momentum=0.5)
    hp = mu.get_trainable_opt_params(opt)
    meta_opt = torch.optim.SGD(hp["lr"], lr=0.2)
    # Query = support: the best lrs are the ones that fit the inner data fastest.
    support = slice(None, 4)
    first = _meta_loss(model, hp, support).item()
    for _ in range(10):
        meta_opt.zero_grad()
        _meta_loss(model, hp, support).backward()
        meta_opt.step()
    assert _meta_loss(model, hp, support).item() < 0.8 * first
    mu.apply_trainable_opt_params(opt, hp)
    learned = [g["lr"] for g in opt.param_groups]
    assert all(type(v) is float for v in learned)
    assert learned == pytest.approx([t.item() for t in hp["lr"]])
    assert learned != pytest.approx([0.2, 0.1])


# -- higher.utils and make_functional -------------------------------------------------------
def test_utils_helpers() -> None:
    nested = {"a": [1, (2, 3)], "b": {"c": 4}}
    assert utils.flatten(nested) == [1, 2, 3, 4]
    assert utils._recursive_map(nested, lambda v: v * 10) == {"a": [10, (20, 30)], "b": {"c": 40}}
    assert type(utils._recursive_map((1, 2), str)) is tuple
    assert utils._is_container([]) and utils._is_container({1}) and not utils._is_container(1)
    t = torch.ones(2, requires_grad=True)
    copied = utils._recursive_copy_and_cast([t, 5], None)
    assert copied[1] == 5 and copied[0] is not t and copied[0].requires_grad
    assert copied[0].is_leaf and copied[0].data_ptr() != t.data_ptr()
    shared = utils._copy_tensor(t, safe_copy=False)
    assert shared.data_ptr() == t.data_ptr() and shared.is_leaf
    a, b = torch.zeros(1), torch.zeros(1)
    assert utils._find_param_in_list(b, [a, b]) == 1  # by identity, not value
    assert utils._find_param_in_list(torch.zeros(1), [a, b]) is None


def test_param_mapping_and_func_params_with_reused_module() -> None:
    proj = nn.Linear(2, 2)
    model = nn.Sequential(proj, nn.Tanh(), proj, nn.Linear(2, 1))
    seen: list[torch.Tensor] = []
    mapping = utils._get_param_mapping(model, seen, [])
    assert mapping == [0, 1, 0, 1, 2, 3]
    assert [id(p) for p in seen] == [id(p) for p in model.parameters()]
    params = utils.get_func_params(model)
    assert len(params) == 4
    for p, q in zip(params, model.parameters()):
        assert p is not q and p.is_leaf and p.requires_grad and torch.equal(p, q)


def test_make_functional() -> None:
    model = _model()
    x, _ = _xy()
    fm = mu.make_functional(model)
    with pytest.raises(mu.HistoryError, match="no fast weights yet.*params="):
        fm(x)
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    assert torch.equal(fm(x, params=zeros), torch.zeros(8, 2, dtype=DT))
    torch.testing.assert_close(fm(x, params=list(model.parameters())), model(x))
    assert fm.time == 1

    def encapsulate(fmodel: mu.FunctionalModule, module: nn.Module) -> None:
        fmodel.update_params(utils.get_func_params(module))

    fm2 = mu.make_functional(model, encapsulator=encapsulate)
    torch.testing.assert_close(fm2(x), model(x))


def test_grad_callback_is_applied() -> None:
    """What higher's testDiffOptCallback means to check, without relying on Adam's eps:
    SGD on callback-scaled gradients equals SGD with the lr scaled the same way."""
    model = _model()
    scaled = _run_with_callback(model, lambda gs: [g * 0.5 for g in gs])
    for got, want in zip(scaled, _sgd_by_hand(model, [0.1, 0.05])):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def _run_with_callback(model: nn.Module, callback) -> list[torch.Tensor]:
    x, y = _xy()
    opt = _two_groups(model)
    fm = mu.monkeypatch(model)
    diffopt = mu.get_diff_optim(opt, model.parameters(), fm, grad_callback=callback)
    for _ in range(3):
        diffopt.step(F.mse_loss(fm(x), y))
    return list(fm.parameters())
