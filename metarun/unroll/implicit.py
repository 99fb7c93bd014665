"""Implicit differentiation: hypergradients through the optimality condition of an inner problem.

Unrolled differentiation (:func:`metarun.unroll.inner_loop`) keeps every inner step in the graph,
so its memory grows with the number of steps. When the inner loop solves a problem, its
solution ``phi*(outer)`` satisfies a stationarity condition ``F(phi*, outer) = 0`` (for an
inner objective ``g``: ``F = dg/dphi``), and the implicit function theorem gives the
hypergradient of an outer loss ``L(phi*)`` without the steps::

    dL/d outer = -(dF/d outer)^T v,    where   (dF/dphi)^T v = dL/dphi   at phi*.

The linear system is solved with Jacobian-vector products only: :class:`CG` (conjugate
gradient: ``dF/dphi`` must be symmetric positive definite, as the Hessian of a strongly convex
inner objective is) or :class:`Neumann` (truncated Neumann series, any ``dF/dphi`` whose
eigenvalues lie in ``(0, 2 / alpha)``). Memory is that of one linearisation of ``F`` at the
solution, whatever the number of inner steps that found it.

Everything takes parameters as ``dict[str, Tensor]`` (:func:`~metarun.unroll.get_params`,
:func:`~metarun.unroll.functional_call`) and is written with ``torch.func``, so it also runs
under ``torch.func.vmap`` (a batch of inner problems at once). Under vmap the solvers run
their full iteration count (per-problem early stopping cannot steer Python), converged
problems frozen; the convergence check then happens outside vmap: return ``info.residual``
from the vmapped function and call :func:`check_converged`.

Example (hyperparameter optimisation: ridge regression's regularisation strength)::

    def objective(w, outer):                        # the inner problem
        return 0.5 * ((x @ w["w"] - y) ** 2).sum() + 0.5 * outer["lam"] * (w["w"] ** 2).sum()

    w_star = {"w": solve_inner(...)}                # by any inner optimizer, to convergence
    outer_grad = {"w": x_val.T @ (x_val @ w_star["w"] - y_val)}    # dL/dw at w*
    result = implicit_grad(stationarity_of(objective), w_star, {"lam": lam}, outer_grad,
                           solver=CG(tol=1e-8, max_iter=100))
    result.grads["lam"]                             # dL/dlam

    # or into .grad of meta-parameters (e.g. get_params(model)), as a vector-Jacobian product:
    surrogate, info = implicit_surrogate(stationarity_of(objective), w_star, outer, outer_grad)
    surrogate.backward()

References:
    Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019.
    Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020 (the Neumann series).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Params = dict[str, Tensor]
Stationarity = Callable[[Params, Params], Params]
"""``F(solution, outer) -> residuals``: one tensor per entry of ``solution``, zero at the inner
solution (e.g. the inner objective's gradient, :func:`stationarity_of`)."""
MatVec = Callable[[Params], Params]
OnFail = Literal["raise", "warn", "ignore"]


class ImplicitSolverError(RuntimeError):
    """The linear solver of an implicit hypergradient did not reach its tolerance."""


@dataclass
class SolverInfo:
    """How a linear solve went.

    Attributes:
        solver: ``"cg"`` or ``"neumann"``.
        iterations: iterations run (matrix-vector products; under vmap the cap).
        residual: relative residual ``||A x - b|| / ||b||`` at the end, a 0-d tensor (one per
            problem under vmap).
        tol: the tolerance on ``residual`` (``None``: a truncated series, no target).
        indefinite: CG met a direction of non-positive curvature (the matrix is not positive
            definite: CG's answer is meaningless), a 0-d bool tensor.
    """

    solver: str
    iterations: int
    residual: Tensor
    tol: float | None
    indefinite: Tensor

    @property
    def converged(self) -> Tensor:
        """0-d bool tensor: the residual reached ``tol`` (always true without a ``tol``) and
        the matrix showed no negative curvature."""
        ok = ~self.indefinite
        if self.tol is None:
            return ok
        return ok & (self.residual <= self.tol)


@dataclass(frozen=True)
class CG:
    """Conjugate gradient for a symmetric positive definite system.

    Args:
        tol: stop when the relative residual ``||A x - b|| / ||b||`` is at most ``tol``.
        max_iter: at most this many matrix-vector products.
    """

    tol: float = 1e-6
    max_iter: int = 100

    def __post_init__(self) -> None:
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ValueError(f"CG tol must be a finite number >= 0, got {self.tol!r}")
        if self.max_iter < 1:
            raise ValueError(f"CG max_iter must be >= 1, got {self.max_iter!r} (e.g. 100)")

    def solve(self, matvec: MatVec, b: Params) -> tuple[Params, SolverInfo]:
        """``x`` with ``matvec(x) ~= b``, starting from 0, and how the solve went."""
        b_norm = _norm(b)
        target = self.tol * b_norm
        x = {k: torch.zeros_like(t) for k, t in b.items()}
        r = dict(b)
        p = dict(b)
        rr = _dot(r, r)
        indefinite = torch.zeros((), dtype=torch.bool, device=rr.device)
        iterations = 0
        for _ in range(self.max_iter):
            active = (rr.sqrt() > target) & ~indefinite
            if _concrete(active) is False:
                break
            ap = matvec(p)
            pap = _dot(p, ap)
            indefinite = indefinite | (active & (pap <= 0))
            active = active & (pap > 0)
            # Masked rather than branched, so that each problem of a vmapped batch stops on
            # its own: a finished (or indefinite) one takes steps of size 0.
            alpha = torch.where(active, rr / torch.where(active, pap, 1.0), 0.0)
            x = {k: x[k] + alpha * p[k] for k in x}
            r = {k: r[k] - alpha * ap[k] for k in r}
            rr_new = _dot(r, r)
            beta = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
            p = {k: r[k] + beta * p[k] for k in p}
            rr = torch.where(active, rr_new, rr)
            iterations += 1
        residual = torch.where(b_norm > 0, rr.sqrt() / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
        return x, SolverInfo("cg", iterations, residual, self.tol, indefinite)


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series: ``x = alpha * sum_{j < steps} (I - alpha A)^j b``.

    Converges to ``A^{-1} b`` when every eigenvalue of ``A`` lies in ``(0, 2 / alpha)``; a few
    terms give a cheap, biased approximation (Lorraine et al. 2020). Any ``A``, symmetric or
    not.

    Args:
        steps: terms of the series (matrix-vector products).
        alpha: step size (an inner learning rate is the usual choice: the series is then the
            inner gradient descent's own linearisation).
        tol: stop when the relative residual is at most ``tol``; ``None``: always sum
            ``steps`` terms and report the residual without judging it (truncation by design).
    """

    steps: int = 50
    alpha: float = 0.1
    tol: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Neumann steps must be >= 1, got {self.steps!r} (e.g. 50)")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"Neumann alpha must be a finite number > 0, got {self.alpha!r}")
        if self.tol is not None and not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ValueError(f"Neumann tol must be a finite number >= 0 or None, got {self.tol!r}")

    def solve(self, matvec: MatVec, b: Params) -> tuple[Params, SolverInfo]:
        """``x ~= A^{-1} b`` and how the solve went. The residual ``b - A x`` is the next term
        ``(I - alpha A)^steps b``, so it costs nothing extra."""
        b_norm = _norm(b)
        term = dict(b)
        x = {k: torch.zeros_like(t) for k, t in b.items()}
        target = None if self.tol is None else self.tol * b_norm
        iterations = 0
        for _ in range(self.steps):
            active = torch.ones((), dtype=torch.bool, device=b_norm.device)
            if target is not None:
                active = _norm(term) > target
                if _concrete(active) is False:
                    break
            step = self.alpha * active.to(b_norm.dtype)  # 0 once a vmapped problem is done
            x = {k: x[k] + step * term[k] for k in x}
            a_term = matvec(term)
            term = {k: torch.where(active, term[k] - self.alpha * a_term[k], term[k]) for k in x}
            iterations += 1
        residual = torch.where(b_norm > 0, _norm(term) / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
        indefinite = torch.zeros((), dtype=torch.bool, device=b_norm.device)
        return x, SolverInfo("neumann", iterations, residual, self.tol, indefinite)


Solver = CG | Neumann


@dataclass
class ImplicitGrad:
    """What :func:`implicit_grad` returns.

    Attributes:
        grads: the implicit hypergradient ``-(dF/d outer)^T v`` for each entry of ``outer``
            (same shapes). A direct dependence of the outer loss on ``outer`` is not in it:
            add that gradient yourself.
        adjoint: ``v``, the solution of ``(dF/dphi)^T v = dL/dphi`` (keyed like the solution).
        info: how the linear solve went.
    """

    grads: Params
    adjoint: Params
    info: SolverInfo


def stationarity_of(objective: Callable[[Params, Params], Tensor]) -> Stationarity:
    """The stationarity condition of an inner objective ``g(solution, outer) -> scalar``: its
    gradient with respect to ``solution`` (``torch.func.grad``, so vmap-compatible and
    differentiable with respect to ``outer``)."""
    return torch.func.grad(objective, argnums=0)


def hvp(objective: Callable[[Params], Tensor], params: Params) -> MatVec:
    """``v -> H v``, the Hessian of ``objective`` at ``params`` times ``v`` (dicts keyed like
    ``params``), through ``torch.func`` (one linearisation, reused by every product).

    The products carry no graph to ``params`` or to tensors ``objective`` closes over.
    """
    point = {k: t.detach() for k, t in params.items()}
    vjp_fn = torch.func.vjp(torch.func.grad(objective), point)[1]

    def product(v: Params) -> Params:
        (out,) = vjp_fn(v)
        return {k: t.detach() for k, t in out.items()}

    return product


def linearize(stationarity: Stationarity, solution: Params, outer: Params) -> MatVec:
    """``v -> (dF/dphi)^T v`` at ``(solution, outer)``: the transposed matrix of the implicit
    system (the Hessian of the inner objective when ``F`` is its gradient)."""
    point = {k: t.detach() for k, t in solution.items()}
    fixed = {k: t.detach() for k, t in outer.items()}
    vjp_fn = torch.func.vjp(lambda s: stationarity(s, fixed), point)[1]

    def product(v: Params) -> Params:
        (out,) = vjp_fn(v)
        return {k: t.detach() for k, t in out.items()}

    return product


def check_converged(info: SolverInfo, on_fail: OnFail = "raise") -> None:
    """Raise :class:`ImplicitSolverError` (``"raise"``), warn (``"warn"``) or do nothing
    (``"ignore"``) if the solve did not converge. Call it outside vmap with the batched
    ``info`` fields (``residual`` and ``indefinite`` of every problem)."""
    if on_fail not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_fail must be 'raise', 'warn' or 'ignore', got {on_fail!r}")
    if on_fail == "ignore":
        return
    converged = info.converged
    if bool(converged.all()):
        return
    failed = int((~converged).sum())
    worst = float(info.residual.max())
    if bool(info.indefinite.any()):
        message = (
            f"implicit gradient: CG met non-positive curvature in {failed} of "
            f"{converged.numel()} problem(s): the system matrix dF/dphi is not positive "
            "definite (the inner solution is not a strict minimum, or the objective is not "
            "convex there); add damping (e.g. a proximal term) or use Neumann"
        )
    else:
        fix = (
            "raise max_iter or loosen tol"
            if info.solver == "cg"
            else "raise steps, lower alpha (the series diverges when alpha * the largest "
            "eigenvalue > 2), or loosen tol"
        )
        message = (
            f"implicit gradient: {info.solver} did not converge in {info.iterations} "
            f"iterations: relative residual {worst:.3g} > tol {info.tol:g} in {failed} of "
            f"{converged.numel()} problem(s) ({fix})"
        )
    if on_fail == "raise":
        raise ImplicitSolverError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def solve_adjoint(
    stationarity: Stationarity,
    solution: Params,
    outer: Params,
    outer_grad: Mapping[str, Tensor],
    *,
    solver: Solver | None = None,
    on_fail: OnFail = "raise",
) -> tuple[Params, SolverInfo]:
    """``v`` with ``(dF/dphi)^T v = outer_grad`` at ``(solution, outer)``, and the solve's info
    (checked with :func:`check_converged` unless under vmap)."""
    _check_keys(solution, outer_grad)
    solver = CG() if solver is None else solver
    matvec = linearize(stationarity, solution, outer)
    b = {k: outer_grad[k].detach() for k in solution}
    v, info = solver.solve(matvec, b)
    if _concrete(info.converged) is not None:  # under vmap the caller checks after
        check_converged(info, on_fail)
    return v, info


def implicit_grad(
    stationarity: Stationarity,
    solution: Params,
    outer: Params,
    outer_grad: Mapping[str, Tensor],
    *,
    solver: Solver | None = None,
    on_fail: OnFail = "raise",
) -> ImplicitGrad:
    """Hypergradient of an outer loss with respect to ``outer`` through the inner solution.

    Args:
        stationarity: ``F(solution, outer) -> dict`` keyed like ``solution``, zero at the
            inner solution; :func:`stationarity_of` ``(objective)`` for an inner objective.
        solution: the inner solution ``phi*`` (``dict[str, Tensor]``; treated as constant: how
            it was found does not matter, only that ``F`` is ~0 there).
        outer: the outer variables ``F`` depends on (meta-parameters, hyperparameters), by name.
        outer_grad: ``dL/dphi`` at ``phi*``, keyed like ``solution``.
        solver: :class:`CG` (default ``CG()``) or :class:`Neumann`.
        on_fail: what a solve that misses its tolerance does: ``"raise"``
            :class:`ImplicitSolverError`, ``"warn"`` (``RuntimeWarning``) or ``"ignore"``;
            ``info`` says in every case. Under vmap nothing is checked here (see
            :func:`check_converged`).

    Returns:
        :class:`ImplicitGrad`: ``grads`` keyed like ``outer``, the adjoint ``v``, ``info``.

    Raises:
        ImplicitSolverError: the solve did not converge and ``on_fail="raise"``.
        ValueError: ``outer_grad`` is not keyed like ``solution``.
    """
    v, info = solve_adjoint(
        stationarity, solution, outer, outer_grad, solver=solver, on_fail=on_fail
    )
    point = {k: t.detach() for k, t in solution.items()}
    fixed = {k: t.detach() for k, t in outer.items()}
    vjp_fn = torch.func.vjp(lambda o: stationarity(point, o), fixed)[1]
    (cross,) = vjp_fn(v)
    return ImplicitGrad({k: -t for k, t in cross.items()}, v, info)


def implicit_surrogate(
    stationarity: Stationarity,
    solution: Params,
    outer: Params,
    outer_grad: Mapping[str, Tensor],
    *,
    solver: Solver | None = None,
    on_fail: OnFail = "raise",
) -> tuple[Tensor, SolverInfo]:
    """A scalar whose gradient with respect to ``outer`` is the implicit hypergradient.

    ``-sum_k <F(phi*, outer)_k, v_k>`` with ``phi*`` and ``v`` constant: backpropagating it
    (``surrogate.backward()``, or adding it to a loss with the direct terms) puts the
    hypergradient into ``.grad`` of the ``outer`` tensors that are leaves, e.g. a model's
    parameters from :func:`~metarun.unroll.get_params`. Its value is 0 up to the inner
    solution's residual and means nothing. Arguments as :func:`implicit_grad`; under vmap,
    sum the batched surrogates before ``backward``.
    """
    v, info = solve_adjoint(
        stationarity, solution, outer, outer_grad, solver=solver, on_fail=on_fail
    )
    point = {k: t.detach() for k, t in solution.items()}
    residuals = stationarity(point, outer)
    surrogate = -sum((residuals[k] * v[k]).sum() for k in v)
    return torch.as_tensor(surrogate), info


# -- dict-vector helpers ------------------------------------------------------------------------
def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([(a[k] * b[k]).sum() for k in a]).sum()


def _norm(a: Mapping[str, Tensor]) -> Tensor:
    return _dot(a, a).sqrt()


def _concrete(flag: Tensor) -> bool | None:
    """``flag`` as a Python bool, or ``None`` under vmap, where it holds one value per problem
    and cannot steer Python control flow (torch.func has no public query for being under vmap;
    vmap refuses the conversion with a RuntimeError)."""
    try:
        return bool(flag)
    except RuntimeError:
        return None


def _check_keys(solution: Mapping[str, Tensor], outer_grad: Mapping[str, Tensor]) -> None:
    if set(solution) != set(outer_grad):
        raise ValueError(
            "outer_grad must be keyed like the solution (dL/dphi for every entry of phi), got "
            f"keys {sorted(outer_grad)} for a solution with keys {sorted(solution)}"
        )
