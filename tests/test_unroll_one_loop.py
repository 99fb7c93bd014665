"""The one inner loop and the one optimizer registry: inner_loop gives identical results through
both gradient engines (autograd, torch.func), both register functions reach one registry, and
higher's module name metarun.unroll.optim keeps exposing higher's names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metarun.unroll as mu
from metarun.unroll import optimizers
from metarun.unroll.batched import func_inner_loop

DT = torch.float64


def _setup(frozen: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    if frozen:
        model[0].bias.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, dtype=DT, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    return model, x, y


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize(
    "make_opt,hyper_of",
    [
        (lambda: mu.SGD(momentum=0.5), lambda t: {"lr": t}),
        (lambda: mu.Adam(), lambda t: {"lr": t, "betas": (t * 3, 0.99)}),
        # Meta-SGD: one learned rate per parameter element.
        (lambda: mu.SGD(), None),
    ],
    ids=["sgd", "adam_betas", "metasgd"],
)
@pytest.mark.parametrize("frozen", [False, True], ids=["all", "frozen"])
def test_one_loop_same_results_through_both_engines(make_opt, hyper_of, first_order, frozen):
    model, x, y = _setup(frozen)

    def run(grad: str):
        lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
        if hyper_of is None:
            rates = {
                n: torch.full_like(p, 0.2).requires_grad_()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
            hyper, leaves = {"lr": rates}, list(rates.values())
        else:
            hyper, leaves = hyper_of(lr), [lr]
        params = mu.get_params(model)

        def loss_fn(p):
            return F.cross_entropy(mu.functional_call(model, p, x), y)

        res = mu.inner_loop(
            loss_fn, params, make_opt(), 3, hyper=hyper, first_order=first_order, grad=grad
        )
        meta = F.cross_entropy(mu.functional_call(model, res.params, x), y)
        wrt = [p for p in model.parameters() if p.requires_grad] + leaves
        return res, torch.autograd.grad(meta, wrt, allow_unused=True)

    (res_a, grads_a), (res_f, grads_f) = run("autograd"), run("func")
    assert list(res_a.params) == list(res_f.params) == [n for n, _ in model.named_parameters()]
    for n in res_a.params:
        torch.testing.assert_close(res_a.params[n], res_f.params[n], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.stack(res_a.losses), torch.stack(res_f.losses))
    assert res_a.history is None and res_f.history is None
    for ga, gf in zip(grads_a, grads_f):
        assert (ga is None) == (gf is None)
        if ga is not None:
            torch.testing.assert_close(ga, gf, rtol=1e-10, atol=1e-13)
    if frozen:  # frozen parameters: unchanged, no gradient
        assert res_f.params["0.bias"] is model[0].bias
    if first_order and hyper_of is not None:
        # a tensor lr still gets its (first-order) hypergradient through the update
        assert grads_f[-1] is not None and grads_f[-1].abs() > 0


def test_func_inner_loop_is_inner_loop_under_vmap() -> None:
    model, x, y = _setup()
    xb, yb = x.view(2, 5, 4), y.view(2, 5)

    def task(p, sx, sy, engine):
        def inner(q):
            return F.cross_entropy(mu.functional_call(model, q, sx), sy)

        if engine == "wrapper":
            adapted = func_inner_loop(inner, p, mu.SGD(lr=0.3), 2)
        else:
            adapted = mu.inner_loop(inner, p, mu.SGD(lr=0.3), 2, grad=mu.GradBackend.func).params
        return F.cross_entropy(mu.functional_call(model, adapted, sx), sy)

    out = {
        e: torch.func.vmap(lambda p, sx, sy, e=e: task(p, sx, sy, e), in_dims=(None, 0, 0))(
            mu.get_params(model), xb, yb
        )
        for e in ("wrapper", "inner_loop")
    }
    assert torch.equal(out["wrapper"], out["inner_loop"])
    looped = torch.stack([task(mu.get_params(model), xb[i], yb[i], "wrapper") for i in range(2)])
    torch.testing.assert_close(out["wrapper"], looped)


@pytest.mark.parametrize(
    "kw",
    [
        {"truncate": 1},
        {"checkpoint": True},
        {"keep_history": True},
        {"track_higher_grads": False},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_func_engine_refuses_autograd_only_options(kw) -> None:
    model, x, y = _setup()
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"grad='func'\) does not support {name}="):
        mu.inner_loop(
            lambda p: F.cross_entropy(mu.functional_call(model, p, x), y),
            mu.get_params(model),
            mu.SGD(),
            1,
            grad="func",
            **kw,
        )


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match=r"grad must be one of 'autograd', 'func', got 'jax'"):
        mu.inner_loop(lambda p: p["w"].sum(), {"w": torch.zeros(1)}, mu.SGD(), 1, grad="jax")


# -- one registry ------------------------------------------------------------------------------


@pytest.fixture
def clean_registry():
    saved = dict(optimizers.REGISTRY)
    yield optimizers.REGISTRY
    optimizers.REGISTRY.clear()
    optimizers.REGISTRY.update(saved)


def test_one_registry_reached_by_both_register_functions(clean_registry) -> None:
    class MySGD(torch.optim.SGD):
        pass

    class MyAdam(torch.optim.Adam):
        pass

    w = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match=r"register_functional\(.*register_optim\("):
        mu.get_diff_optim(MySGD(w, lr=0.1), w)  # exact types only, as in higher

    # higher's name: one entry, seen by both layers
    n = len(clean_registry)
    mu.register_optim(MySGD, mu.optim.DifferentiableSGD)
    assert len(clean_registry) == n + 1
    assert clean_registry[MySGD] == optimizers.Registration(mu.SGD, mu.optim.DifferentiableSGD)
    assert mu.functional_for(MySGD) is mu.SGD
    assert type(mu.get_diff_optim(MySGD(w, lr=0.1), w)) is mu.optim.DifferentiableSGD

    # metarun's name: the same table; get_diff_optim builds the generic class over the rule
    mu.register_functional(MyAdam, mu.Adam)
    assert len(clean_registry) == n + 2
    assert clean_registry[MyAdam] == optimizers.Registration(mu.Adam)
    assert type(mu.get_diff_optim(MyAdam(w), w)) is mu.optim.DifferentiableAdam

    # a later registration of a type replaces the earlier one (still one entry)
    mu.register_functional(MySGD, mu.Adam)
    assert len(clean_registry) == n + 2
    assert type(mu.get_diff_optim(MySGD(w, lr=0.1), w)) is mu.optim.DifferentiableAdam


def test_register_functions_check_their_arguments(clean_registry) -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        mu.register_functional(mu.SGD, mu.SGD)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="FunctionalOptimizer subclass"):
        mu.register_functional(torch.optim.SGD, torch.optim.SGD)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DifferentiableOptimizer subclass"):
        mu.register_optim(torch.optim.SGD, mu.SGD)  # type: ignore[arg-type]


def test_functional_for_accepts_subclasses_of_registered_types() -> None:
    class MySGD(torch.optim.SGD):
        pass

    assert mu.functional_for(MySGD) is mu.SGD
    assert mu.functional_for(torch.optim.AdamW) is mu.AdamW  # exact type before the base
    with pytest.raises(TypeError, match="LBFGS.*Supported: ASGD"):
        mu.functional_for(torch.optim.LBFGS)


HIGHER_OPTIM_NAMES = [
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdagrad",
    "DifferentiableAdadelta",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
]


@pytest.mark.parametrize("name", HIGHER_OPTIM_NAMES)
def test_optim_module_keeps_higher_names(name) -> None:
    import metarun.unroll.diffopt as diffopt
    import metarun.unroll.optim as optim

    assert getattr(mu.optim, name) is getattr(optim, name) is getattr(diffopt, name)
    assert name in optim.__all__


def test_func_loop_takes_the_trainable_names_explicitly_under_vmap():
    """Stepping a vmapped loop one step at a time: after the first step the tensors no longer
    report requires_grad inside vmap, so the caller names what the loop updates; the result is
    the two-step loop's, and a frozen tensor stays as it was."""
    from metarun.unroll import SGD
    from metarun.unroll.batched import func_inner_loop

    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64)  # frozen
    xs = torch.randn(4, 5, 3, dtype=torch.float64)
    ys = torch.randn(4, 5, 2, dtype=torch.float64)

    def task(x, y, stepwise):
        def loss(p):
            return ((x @ p["w"] + p["b"] - y) ** 2).mean()

        params = {"w": w, "b": b}
        if not stepwise:
            return func_inner_loop(loss, params, SGD(lr=0.1), 2)["w"]
        for _ in range(2):
            params = func_inner_loop(loss, params, SGD(lr=0.1), 1, trainable=["w"])
        assert params["b"] is b
        return params["w"]

    whole = torch.func.vmap(lambda x, y: task(x, y, False))(xs, ys)
    stepped = torch.func.vmap(lambda x, y: task(x, y, True))(xs, ys)
    assert torch.equal(whole, stepped)
    (g_whole,) = torch.autograd.grad(whole.sum(), w)
    (g_stepped,) = torch.autograd.grad(stepped.sum(), w)
    assert torch.allclose(g_whole, g_stepped, rtol=1e-12, atol=0)


def test_trainable_names_are_for_the_func_backend():
    from metarun.unroll import SGD, inner_loop

    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="trainable is for grad='func'"):
        inner_loop(lambda p: p["w"].sum(), {"w": w}, SGD(lr=0.1), 1, trainable=["w"])
