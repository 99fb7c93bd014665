"""Implicit differentiation (metarun.unroll.implicit), in float64: ridge and logistic regression
hypergradients against their closed forms and finite differences, agreement with unrolled
differentiation run to convergence, parameter dicts of a module, vmap, and the solver's
non-convergence errors and warnings."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import CentralDifference
from torch import Tensor, nn

import metarun.unroll as mu
from metarun.unroll import CG, ImplicitSolverError, Neumann, implicit_grad, stationarity_of

DT = torch.float64


def _ridge_data(seed: int = 0, n: int = 12, d: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = x @ w + 0.3 * torch.randn(n, generator=g, dtype=DT)
    yv = xv @ w + 0.3 * torch.randn(n, generator=g, dtype=DT)
    return x, y, xv, yv


def _ridge_objective(x: Tensor, y: Tensor):
    """g(w, outer) = 1/2 ||x w - y||^2 + lam/2 ||w - theta||^2: a ridge regression pulled
    towards the meta-parameter theta (theta = 0: plain ridge)."""

    def objective(w: dict[str, Tensor], outer: dict[str, Tensor]) -> Tensor:
        fit = 0.5 * ((x @ w["w"] - y) ** 2).sum()
        return fit + 0.5 * outer["lam"] * ((w["w"] - outer["theta"]) ** 2).sum()

    return objective


def _ridge_solution(x: Tensor, y: Tensor, lam: Tensor, theta: Tensor) -> Tensor:
    a = x.T @ x + lam * torch.eye(x.shape[1], dtype=DT)
    return torch.linalg.solve(a, x.T @ y + lam * theta)


def _ridge_closed_form(x, y, xv, yv, lam, theta) -> tuple[Tensor, Tensor]:
    """dL/dlam and dL/dtheta of L = 1/2 ||xv w* - yv||^2 by the implicit function theorem
    written out with explicit matrices: A = x^T x + lam I, dw*/dlam = A^-1 (theta - w*),
    dw*/dtheta = lam A^-1."""
    a = x.T @ x + lam * torch.eye(x.shape[1], dtype=DT)
    w = _ridge_solution(x, y, lam, theta)
    dl_dw = xv.T @ (xv @ w - yv)
    a_inv_g = torch.linalg.solve(a, dl_dw)  # A is symmetric
    return (theta - w) @ a_inv_g, lam * a_inv_g


def _ridge_problem(seed: int = 0):
    x, y, xv, yv = _ridge_data(seed)
    lam = torch.tensor(0.7, dtype=DT)
    theta = torch.linspace(-1, 1, x.shape[1], dtype=DT)
    w = _ridge_solution(x, y, lam, theta)
    outer_grad = {"w": xv.T @ (xv @ w - yv)}
    return x, y, xv, yv, lam, theta, w, outer_grad


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    "solver",
    [CG(tol=1e-12, max_iter=50), Neumann(steps=3000, alpha=0.02, tol=1e-12)],
    ids=["cg", "neumann"],
)
def test_ridge_hypergradients_match_the_closed_form(solver) -> None:
    x, y, xv, yv, lam, theta, w, outer_grad = _ridge_problem()
    result = implicit_grad(
        stationarity_of(_ridge_objective(x, y)),
        {"w": w},
        {"lam": lam, "theta": theta},
        outer_grad,
        solver=solver,
    )
    d_lam, d_theta = _ridge_closed_form(x, y, xv, yv, lam, theta)
    torch.testing.assert_close(result.grads["lam"], d_lam, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.grads["theta"], d_theta, rtol=1e-9, atol=1e-10)
    assert bool(result.info.converged) and result.info.residual <= 1e-12
    # CG on a 4-dimensional SPD system is exact in at most 4 products.
    if isinstance(solver, CG):
        assert result.info.iterations <= 4


def test_ridge_closed_form_matches_finite_differences() -> None:
    """The oracle itself, against central differences of the re-solved problem."""
    x, y, xv, yv, lam, theta, _, _ = _ridge_problem()

    def outer_loss(lam: Tensor, theta: Tensor) -> Tensor:
        return 0.5 * ((xv @ _ridge_solution(x, y, lam, theta) - yv) ** 2).sum()

    h = 1e-6
    d_lam, d_theta = _ridge_closed_form(x, y, xv, yv, lam, theta)
    # The absolute tolerance is the difference's roundoff (the outer loss is ~2: 4e-9 at this h;
    # atol=1e-8 was 2x above it).
    fd = CentralDifference(float(outer_loss(lam + h, theta)), float(outer_loss(lam - h, theta)), h)
    assert float(d_lam) == fd.approx(rel=1e-6)
    e0 = torch.zeros_like(theta)
    e0[0] = h
    fd0 = CentralDifference(
        float(outer_loss(lam, theta + e0)), float(outer_loss(lam, theta - e0)), h
    )
    assert float(d_theta[0]) == fd0.approx(rel=1e-6)


def _logistic_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    x, xv = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(20, 3, generator=g, dtype=DT)
    w = torch.tensor([1.5, -2.0, 0.5], dtype=DT)
    y = (torch.rand(30, generator=g, dtype=DT) < torch.sigmoid(x @ w)).to(DT)
    yv = (torch.rand(20, generator=g, dtype=DT) < torch.sigmoid(xv @ w)).to(DT)
    return x, y, xv, yv


def _logistic_objective(x: Tensor, y: Tensor):
    def objective(w: dict[str, Tensor], outer: dict[str, Tensor]) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(x @ w["w"], y, reduction="sum")
        return nll + 0.5 * outer["lam"] * (w["w"] ** 2).sum()

    return objective


def _logistic_solution(x: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """Newton's method to machine precision (the objective is strongly convex)."""
    w = torch.zeros(x.shape[1], dtype=DT)
    for _ in range(50):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) + lam * w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + lam * torch.eye(x.shape[1], dtype=DT)
        w = w - torch.linalg.solve(hess, grad)
    return w


def _logistic_outer(xv: Tensor, yv: Tensor, w: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(xv @ w, yv, reduction="sum")


def test_logistic_regression_matches_its_closed_form_and_finite_differences() -> None:
    x, y, xv, yv = _logistic_data()
    lam = torch.tensor(0.5, dtype=DT)
    w = _logistic_solution(x, y, lam)
    dl_dw = xv.T @ (torch.sigmoid(xv @ w) - yv)
    result = implicit_grad(
        stationarity_of(_logistic_objective(x, y)),
        {"w": w},
        {"lam": lam},
        {"w": dl_dw},
        solver=CG(tol=1e-12, max_iter=20),
    )
    # Closed form given w*: dw*/dlam = -H^-1 w*, with H = x^T diag(p (1 - p)) x + lam I.
    p = torch.sigmoid(x @ w)
    hess = x.T @ (x * (p * (1 - p))[:, None]) + lam * torch.eye(3, dtype=DT)
    closed = -w @ torch.linalg.solve(hess, dl_dw)
    torch.testing.assert_close(result.grads["lam"], closed, rtol=1e-10, atol=1e-12)
    h = 1e-5
    fd = (
        _logistic_outer(xv, yv, _logistic_solution(x, y, lam + h))
        - _logistic_outer(xv, yv, _logistic_solution(x, y, lam - h))
    ) / (2 * h)
    torch.testing.assert_close(result.grads["lam"], fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------- against unrolled differentiation


def test_agrees_with_unrolled_differentiation_run_to_convergence() -> None:
    """metarun.unroll's inner_loop, 400 differentiable GD steps (to convergence), backward
    through every step: the same hypergradients as the implicit ones at the loop's end point."""
    x, y, xv, yv, _, _, _, _ = _ridge_problem()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    theta = torch.linspace(-1, 1, 4, dtype=DT).requires_grad_()
    objective = _ridge_objective(x, y)
    start = {"w": torch.zeros(4, dtype=DT, requires_grad=True)}
    result = mu.inner_loop(
        lambda w: objective(w, {"lam": lam, "theta": theta}), start, mu.SGD(lr=0.02), 400
    )
    w = result.params["w"]
    outer_loss = 0.5 * ((xv @ w - yv) ** 2).sum()
    unrolled = torch.autograd.grad(outer_loss, (lam, theta))
    solution = {"w": w.detach()}
    implicit = implicit_grad(
        stationarity_of(objective),
        solution,
        {"lam": lam, "theta": theta},
        {"w": xv.T @ (xv @ solution["w"] - yv)},
        solver=CG(tol=1e-12, max_iter=50),
    )
    torch.testing.assert_close(implicit.grads["lam"], unrolled[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(implicit.grads["theta"], unrolled[1], rtol=1e-8, atol=1e-10)
    # A handful of steps is far from the solution and the implicit gradient is then wrong: the
    # agreement above is the convergence, not a coincidence.
    short = mu.inner_loop(
        lambda w: objective(w, {"lam": lam, "theta": theta}), start, mu.SGD(lr=0.02), 3
    )
    early = torch.autograd.grad(0.5 * ((xv @ short.params["w"] - yv) ** 2).sum(), lam)[0]
    assert not torch.allclose(early, implicit.grads["lam"], rtol=1e-2)


def test_surrogate_backward_fills_grad_of_a_models_parameters() -> None:
    """iMAML's shape: meta-parameters are a module's get_params() dict, the inner problem a
    proximal linear regression through functional_call; surrogate.backward() fills .grad with
    the closed-form meta-gradient lam (H + lam I)^-1 dL/dphi."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    x, y, xv, yv = _ridge_data(2, n=10, d=3)
    lam = 2.0
    theta = mu.get_params(model)

    def objective(phi: dict[str, Tensor], outer: dict[str, Tensor]) -> Tensor:
        out = mu.functional_call(model, phi, x).squeeze(-1)
        prox = sum(((phi[k] - outer[k]) ** 2).sum() for k in phi)
        return 0.5 * ((out - y) ** 2).sum() + 0.5 * lam * prox

    # The exact inner solution: least squares on [x, 1] pulled towards theta.
    xa = torch.cat([x, torch.ones(10, 1, dtype=DT)], 1)
    t = torch.cat([theta["weight"].detach().flatten(), theta["bias"].detach()])
    hess = xa.T @ xa + lam * torch.eye(4, dtype=DT)
    phi_flat = torch.linalg.solve(hess, xa.T @ y + lam * t)
    phi = {"weight": phi_flat[:3].view(1, 3), "bias": phi_flat[3:]}
    xva = torch.cat([xv, torch.ones(10, 1, dtype=DT)], 1)
    dl = xva.T @ (xva @ phi_flat - yv)
    outer_grad = {"weight": dl[:3].view(1, 3), "bias": dl[3:]}
    surrogate, info = mu.implicit_surrogate(
        stationarity_of(objective), phi, theta, outer_grad, solver=CG(tol=1e-12)
    )
    surrogate.backward()
    expected = lam * torch.linalg.solve(hess, dl)
    torch.testing.assert_close(model.weight.grad.flatten(), expected[:3], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(model.bias.grad, expected[3:], rtol=1e-9, atol=1e-11)
    assert bool(info.converged)


# ------------------------------------------------------------------------------------ vmap


def test_under_vmap_each_problem_gets_its_own_solve() -> None:
    """Three ridge problems vmapped: per-problem hypergradients equal a loop's; CG runs its full
    cap with finished problems frozen; check_converged afterwards names the failing ones."""
    data = [_ridge_data(seed) for seed in range(3)]
    xs, ys, xvs, yvs = (torch.stack(t) for t in zip(*data))
    lam = torch.tensor(0.7, dtype=DT)
    theta = torch.linspace(-1, 1, 4, dtype=DT)

    def task(x, y, xv, yv, solver):
        w = _ridge_solution(x, y, lam, theta)
        res = implicit_grad(
            stationarity_of(_ridge_objective(x, y)),
            {"w": w},
            {"lam": lam, "theta": theta},
            {"w": xv.T @ (xv @ w - yv)},
            solver=solver,
        )
        return res.grads["lam"], res.grads["theta"], res.info.residual

    solver = CG(tol=1e-12, max_iter=8)
    lam_b, theta_b, residual = torch.func.vmap(lambda *a: task(*a, solver))(xs, ys, xvs, yvs)
    for i in range(3):
        d_lam, d_theta = _ridge_closed_form(xs[i], ys[i], xvs[i], yvs[i], lam, theta)
        torch.testing.assert_close(lam_b[i], d_lam, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(theta_b[i], d_theta, rtol=1e-9, atol=1e-10)
    assert residual.shape == (3,) and bool((residual <= 1e-12).all())

    # One product is too few: nothing raises inside vmap, the check afterwards does.
    _, _, residual = torch.func.vmap(lambda *a: task(*a, CG(tol=1e-12, max_iter=1)))(
        xs, ys, xvs, yvs
    )
    info = mu.SolverInfo("cg", 1, residual, 1e-12, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ImplicitSolverError, match=r"in 3 of 3 problem\(s\)"):
        mu.check_converged(info)


def test_surrogate_under_vmap_backpropagates_the_sum_of_the_tasks() -> None:
    data = [_ridge_data(seed) for seed in range(3)]
    xs, ys, xvs, yvs = (torch.stack(t) for t in zip(*data))
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    theta = torch.linspace(-1, 1, 4, dtype=DT).requires_grad_()

    def task(x, y, xv, yv):
        w = _ridge_solution(x, y, lam.detach(), theta.detach())
        surrogate, info = mu.implicit_surrogate(
            stationarity_of(_ridge_objective(x, y)),
            {"w": w},
            {"lam": lam, "theta": theta},
            {"w": xv.T @ (xv @ w - yv)},
            solver=CG(tol=1e-12, max_iter=8),
        )
        return surrogate

    torch.func.vmap(task)(xs, ys, xvs, yvs).sum().backward()
    forms = [_ridge_closed_form(*(t[i] for t in (xs, ys, xvs, yvs)), lam, theta) for i in range(3)]
    torch.testing.assert_close(lam.grad, sum(f[0] for f in forms).detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(theta.grad, sum(f[1] for f in forms).detach(), rtol=1e-9, atol=1e-10)


def test_vmap_over_a_modules_parameter_dicts_matches_a_loop() -> None:
    """Inner problems through functional_call on an nn.Linear (proximal logistic regression,
    solved by Newton outside), hypergradients w.r.t. the module's get_params() vmapped over
    tasks: the same as task by task."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    theta = mu.get_params(model, copy=True)
    g = torch.Generator().manual_seed(7)
    xs, xvs = (
        torch.randn(3, 10, 3, generator=g, dtype=DT),
        torch.randn(3, 6, 3, generator=g, dtype=DT),
    )
    ys = (torch.rand(3, 10, generator=g, dtype=DT) < 0.5).to(DT)
    yvs = (torch.rand(3, 6, generator=g, dtype=DT) < 0.5).to(DT)

    def objective_for(x, y):
        def objective(phi, outer):
            logits = mu.functional_call(model, phi, x).squeeze(-1)
            prox = sum(((phi[k] - outer[k]) ** 2).sum() for k in phi)
            return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") + prox

        return objective

    def solve(x, y):  # Newton on the proximal problem, in the flat [weight, bias] coordinates
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
        t = torch.cat([theta["weight"].detach().flatten(), theta["bias"].detach()])
        w = t.clone()
        for _ in range(30):
            p = torch.sigmoid(xa @ w)
            grad = xa.T @ (p - y) + 2 * (w - t)
            hess = xa.T @ (xa * (p * (1 - p))[:, None]) + 2 * torch.eye(4, dtype=DT)
            w = w - torch.linalg.solve(hess, grad)
        return {"weight": w[:3].view(1, 3), "bias": w[3:]}

    def task(x, y, xv, yv, phi):
        outer_grad = torch.func.grad(
            lambda q: F.binary_cross_entropy_with_logits(
                mu.functional_call(model, q, xv).squeeze(-1), yv, reduction="sum"
            )
        )(phi)
        res = implicit_grad(
            stationarity_of(objective_for(x, y)), phi, theta, outer_grad,
            solver=CG(tol=1e-12, max_iter=10),
        )  # fmt: skip
        return res.grads

    phis = [solve(xs[i], ys[i]) for i in range(3)]
    stacked = {k: torch.stack([p[k] for p in phis]) for k in phis[0]}
    batched = torch.func.vmap(task)(xs, ys, xvs, yvs, stacked)
    for i in range(3):
        single = task(xs[i], ys[i], xvs[i], yvs[i], phis[i])
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-10, atol=1e-12)
        assert float(single["weight"].abs().sum()) > 0


# ------------------------------------------------------------------------ solver failures


def _ridge_call(solver, on_fail="raise", objective=None):
    x, y, _, _, lam, theta, w, outer_grad = _ridge_problem()
    return implicit_grad(
        stationarity_of(objective or _ridge_objective(x, y)),
        {"w": w},
        {"lam": lam, "theta": theta},
        outer_grad,
        solver=solver,
        on_fail=on_fail,
    )


def test_cg_that_does_not_converge_raises_with_the_residual_and_the_fix() -> None:
    with pytest.raises(
        ImplicitSolverError,
        match=r"cg did not converge in 2 iterations: relative residual [\d.e-]+ > tol 1e-12 "
        r"in 1 of 1 problem\(s\) \(raise max_iter or loosen tol\)",
    ):
        _ridge_call(CG(tol=1e-12, max_iter=2))


def test_warn_and_ignore_return_the_result_with_its_info() -> None:
    with pytest.warns(RuntimeWarning, match="cg did not converge in 2 iterations"):
        result = _ridge_call(CG(tol=1e-12, max_iter=2), on_fail="warn")
    assert not bool(result.info.converged) and result.info.residual > 1e-12
    assert result.info.iterations == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = _ridge_call(CG(tol=1e-12, max_iter=2), on_fail="ignore")
    torch.testing.assert_close(quiet.grads["lam"], result.grads["lam"])


def test_a_diverging_neumann_series_raises_naming_alpha() -> None:
    # x^T x has eigenvalues up to ~30 here: alpha = 0.5 puts the series far outside (0, 2/alpha).
    with pytest.raises(ImplicitSolverError, match=r"neumann did not converge.*lower alpha"):
        _ridge_call(Neumann(steps=20, alpha=0.5, tol=1e-6))
    # Without a tol the series is truncated by design: its residual is reported, not judged.
    result = _ridge_call(Neumann(steps=5, alpha=0.02))
    assert bool(result.info.converged) and result.info.residual > 1e-3


def test_cg_on_an_indefinite_system_raises() -> None:
    x, y, *_ = _ridge_problem()

    def saddle(w: dict[str, Tensor], outer: dict[str, Tensor]) -> Tensor:
        return _ridge_objective(x, y)(w, outer) - 50.0 * (w["w"] ** 2).sum()

    with pytest.raises(ImplicitSolverError, match="not positive definite"):
        _ridge_call(CG(tol=1e-10), objective=saddle)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CG(max_iter=0), "CG max_iter must be >= 1, got 0"),
        (lambda: CG(tol=-1.0), "CG tol must be a finite number >= 0, got -1.0"),
        (lambda: Neumann(alpha=0.0), "Neumann alpha must be a finite number > 0, got 0.0"),
        (lambda: Neumann(steps=0), "Neumann steps must be >= 1, got 0"),
    ],
)
def test_bad_solver_settings_are_refused(make, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_outer_grad_keyed_unlike_the_solution_is_refused() -> None:
    x, y, _, _, lam, theta, w, _ = _ridge_problem()
    with pytest.raises(ValueError, match=r"outer_grad must be keyed like the solution"):
        implicit_grad(
            stationarity_of(_ridge_objective(x, y)),
            {"w": w},
            {"lam": lam, "theta": theta},
            {"v": w},
        )
