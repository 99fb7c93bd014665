"""Differentiable optimizers as pure functions.

Each optimizer is a :class:`FunctionalOptimizer`: ``init`` builds per-parameter state and ``step``
maps ``(params, grads, state, hyper)`` to ``(new_params, new_state)`` without touching its inputs,
so the result is a differentiable function of the parameters, of the state and of every
hyperparameter given as a tensor. The update rules follow the installed ``torch.optim``
single-tensor implementations operation by operation; ``tests/test_unroll_optim.py`` checks them
against ``torch.optim`` in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

Params = dict[str, Tensor]
"""Parameters keyed by ``named_parameters()`` names."""
ParamState = dict[str, Any]
"""One parameter's optimizer state (tensors, plus a float ``step`` where the rule counts steps)."""
State = dict[str, ParamState]
"""Optimizer state keyed by parameter name."""
Hyper = Mapping[str, Any]
"""Hyperparameters: numbers, tensors (possibly requiring grad), tuples of those (``betas``), or
a ``dict`` keyed by parameter name giving one value per parameter (e.g. Meta-SGD learning
rates)."""


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` whose gradient is 0 (not inf, hence no NaN) where ``x == 0``.

    Second moments of parameters with zero gradient are exactly zero; the derivative of ``sqrt``
    there is infinite and ``0 * inf`` poisons every hypergradient with NaN.
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)


def _pow(base: Any, exponent: float) -> Any:
    return base**exponent


class FunctionalOptimizer:
    """Base class: subclasses define ``DEFAULTS``, ``init_param`` and ``update_param``.

    Args:
        **hyper: default hyperparameters, as for the matching ``torch.optim`` class.

    Raises:
        TypeError: for an unknown hyperparameter name.
        ValueError: for an out-of-range numeric value (same checks as ``torch.optim``).
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None

    def __init__(self, **hyper: Any) -> None:
        unknown = set(hyper) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown hyperparameter(s) {sorted(unknown)}; "
                f"known: {sorted(self.DEFAULTS)}"
            )
        self.defaults: dict[str, Any] = {**self.DEFAULTS, **hyper}
        self.validate(self.defaults)

    # -- to be provided by subclasses ------------------------------------------------------
    def init_param(self, p: Tensor, hp: Hyper) -> ParamState:
        """Fresh state for one parameter."""
        return {}

    def update_param(
        self, p: Tensor, g: Tensor, s: ParamState, hp: Hyper
    ) -> tuple[Tensor, ParamState]:
        """One update of one parameter; returns new tensors, never modifies ``p``, ``g``, ``s``."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def validate(self, hp: Hyper) -> None:
        for key in ("lr", "eps", "weight_decay", "momentum", "alpha", "lr_decay"):
            value = hp.get(key)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"{self.name}: invalid {key} value {value}; it must be >= 0")
        betas = hp.get("betas")
        if betas is not None:
            for i, b in enumerate(betas):
                if isinstance(b, (int, float)) and not 0.0 <= b < 1.0:
                    raise ValueError(
                        f"{self.name}: invalid beta parameter at index {i}: {b}; need 0 <= beta < 1"
                    )

    def init(self, params: Params, hyper: Hyper | None = None) -> State:
        """Fresh state for every parameter in ``params``."""
        return {n: self.init_param(p, self._resolve(hyper, n)) for n, p in params.items()}

    def _resolve(self, hyper: Hyper | None, name: str) -> dict[str, Any]:
        hp = dict(self.defaults)
        if hyper:
            for key, value in hyper.items():
                if key not in self.defaults:
                    raise TypeError(
                        f"{self.name} has no hyperparameter {key!r}; known: {sorted(self.defaults)}"
                    )
                hp[key] = value[name] if isinstance(value, dict) else value
        return hp

    def step(
        self,
        params: Params,
        grads: Mapping[str, Tensor | None],
        state: State | None = None,
        hyper: Hyper | None = None,
    ) -> tuple[Params, State]:
        """One differentiable optimizer step.

        Args:
            params: current parameters.
            grads: gradient per parameter name; missing or ``None`` leaves that parameter and its
                state unchanged (frozen or unused parameters).
            state: state from :meth:`init` or a previous step (``None``: fresh state).
            hyper: hyperparameter overrides (see :data:`Hyper`).

        Returns:
            ``(new_params, new_state)``: new dicts; the inputs are not modified.
        """
        state = {} if state is None else state
        new_params: Params = {}
        new_state: State = {}
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                new_params[name] = p
                if name in state:
                    new_state[name] = state[name]
                continue
            hp = self._resolve(hyper, name)
            s = state.get(name)
            if s is None:
                s = self.init_param(p, hp)
            new_params[name], new_state[name] = self.update_param(p, g, s, hp)
        return new_params, new_state

    def state_from_torch(self, torch_state: Mapping[str, Any], p: Tensor) -> ParamState:
        """Converts one parameter's ``torch.optim`` state into ours (tensors cloned, detached)."""
        out: ParamState = {}
        for key, value in torch_state.items():
            if value is None:
                continue
            if key == "step" or key == "mu_product":
                out[key] = float(value)
            elif torch.is_tensor(value):
                out[key] = value.detach().clone().to(p.device)
            else:
                out[key] = value
        return out


def _grad_with_decay(p: Tensor, g: Tensor, hp: Hyper) -> Tensor:
    if hp.get("maximize"):
        g = -g
    wd = hp["weight_decay"]
    if _nonzero(wd):
        g = g + wd * p
    return g


def _nonzero(value: Any) -> bool:
    # A tensor hyperparameter always takes part, so its hypergradient exists even at 0.
    return torch.is_tensor(value) or value != 0


def _adam_moments(
    p: Tensor, g: Tensor, s: ParamState, hp: Hyper
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """What Adam, AdamW, NAdam and RAdam share: sign, weight decay (L2 or decoupled) and the
    two moment updates. Returns ``(p, g, exp_avg, exp_avg_sq, step)``."""
    if hp.get("maximize"):
        g = -g
    lr, wd = hp["lr"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    if _nonzero(wd):
        if hp["decoupled_weight_decay"]:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    exp_avg = s["exp_avg"] + (1 - beta1) * (g - s["exp_avg"])
    exp_avg_sq = s["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
    return p, g, exp_avg, exp_avg_sq, s["step"] + 1


class SGD(FunctionalOptimizer):
    """SGD (momentum, dampening, Nesterov, weight decay, ``maximize``), as ``torch.optim.SGD``."""

    name = "SGD"
    DEFAULTS = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    torch_class = torch.optim.SGD

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        g = _grad_with_decay(p, g, hp)
        momentum = hp["momentum"]
        if _nonzero(momentum):
            buf = s.get("momentum_buffer")
            buf = g if buf is None else buf * momentum + (1 - hp["dampening"]) * g
            s = {"momentum_buffer": buf}
            g = g + momentum * buf if hp["nesterov"] else buf
        return p - hp["lr"] * g, s


class Adam(FunctionalOptimizer):
    """Adam (AMSGrad optional, L2 weight decay), as ``torch.optim.Adam``."""

    name = "Adam"
    DEFAULTS = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    }
    torch_class = torch.optim.Adam

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        s: ParamState = {
            "step": 0.0,
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if hp["amsgrad"]:
            s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return s

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        p, g, exp_avg, exp_avg_sq, step = _adam_moments(p, g, s, hp)
        lr, eps = hp["lr"], hp["eps"]
        beta1, beta2 = hp["betas"]
        bias_correction1 = 1 - _pow(beta1, step)
        bias_correction2 = 1 - _pow(beta2, step)
        step_size = lr / bias_correction1
        bias_correction2_sqrt = _sqrt_scalar(bias_correction2)
        new_s: ParamState = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if hp["amsgrad"]:
            max_sq = torch.maximum(s["max_exp_avg_sq"], exp_avg_sq)
            new_s["max_exp_avg_sq"] = max_sq
            denom = safe_sqrt(max_sq) / bias_correction2_sqrt + eps
        else:
            denom = safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        return p - step_size * exp_avg / denom, new_s


def _sqrt_scalar(x: Any) -> Any:
    return x.sqrt() if torch.is_tensor(x) else math.sqrt(x)


class AdamW(Adam):
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW``."""

    name = "AdamW"
    DEFAULTS = {**Adam.DEFAULTS, "weight_decay": 1e-2, "decoupled_weight_decay": True}
    torch_class = torch.optim.AdamW  # type: ignore[assignment]


class RMSprop(FunctionalOptimizer):
    """RMSprop (centered, momentum), as ``torch.optim.RMSprop``."""

    name = "RMSprop"
    DEFAULTS = {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
    }
    torch_class = torch.optim.RMSprop

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        s: ParamState = {"step": 0.0, "square_avg": torch.zeros_like(p)}
        if _nonzero(hp["momentum"]):
            s["momentum_buffer"] = torch.zeros_like(p)
        if hp["centered"]:
            s["grad_avg"] = torch.zeros_like(p)
        return s

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        g = _grad_with_decay(p, g, hp)
        alpha, eps, lr, momentum = hp["alpha"], hp["eps"], hp["lr"], hp["momentum"]
        new_s: ParamState = {"step": s["step"] + 1}
        square_avg = s["square_avg"] * alpha + (1 - alpha) * g * g
        new_s["square_avg"] = square_avg
        if hp["centered"]:
            grad_avg = s["grad_avg"] + (1 - alpha) * (g - s["grad_avg"])
            new_s["grad_avg"] = grad_avg
            avg = safe_sqrt(square_avg - grad_avg * grad_avg)
        else:
            avg = safe_sqrt(square_avg)
        avg = avg + eps
        if _nonzero(momentum):
            buf = s.get("momentum_buffer")
            buf = (torch.zeros_like(p) if buf is None else buf) * momentum + g / avg
            new_s["momentum_buffer"] = buf
            return p - lr * buf, new_s
        return p - lr * g / avg, new_s


class Adagrad(FunctionalOptimizer):
    """Adagrad (lr decay, initial accumulator), as ``torch.optim.Adagrad``."""

    name = "Adagrad"
    DEFAULTS = {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
    }
    torch_class = torch.optim.Adagrad

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        init = hp["initial_accumulator_value"]
        return {"step": 0.0, "sum": torch.zeros_like(p) + init}

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        step = s["step"] + 1
        g = _grad_with_decay(p, g, hp)
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        state_sum = s["sum"] + g * g
        std = safe_sqrt(state_sum) + hp["eps"]
        return p - clr * g / std, {"step": step, "sum": state_sum}


class Adamax(FunctionalOptimizer):
    """Adamax, as ``torch.optim.Adamax``."""

    name = "Adamax"
    DEFAULTS = {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "maximize": False,
    }
    torch_class = torch.optim.Adamax

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        return {"step": 0.0, "exp_avg": torch.zeros_like(p), "exp_inf": torch.zeros_like(p)}

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        g = _grad_with_decay(p, g, hp)
        beta1, beta2 = hp["betas"]
        step = s["step"] + 1
        exp_avg = s["exp_avg"] + (1 - beta1) * (g - s["exp_avg"])
        exp_inf = torch.maximum(s["exp_inf"] * beta2, g.abs() + hp["eps"])
        clr = hp["lr"] / (1 - _pow(beta1, step))
        new_s = {"step": step, "exp_avg": exp_avg, "exp_inf": exp_inf}
        return p - clr * exp_avg / exp_inf, new_s


class NAdam(FunctionalOptimizer):
    """NAdam (momentum decay, optional decoupled weight decay), as ``torch.optim.NAdam``."""

    name = "NAdam"
    DEFAULTS = {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum_decay": 4e-3,
        "decoupled_weight_decay": False,
        "maximize": False,
    }
    torch_class = torch.optim.NAdam

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        return {
            "step": 0.0,
            "mu_product": 1.0,
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        p, g, exp_avg, exp_avg_sq, step = _adam_moments(p, g, s, hp)
        lr, eps, psi = hp["lr"], hp["eps"], hp["momentum_decay"]
        beta1, beta2 = hp["betas"]
        bias_correction2 = 1 - _pow(beta2, step)
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        mu_product = s["mu_product"] * mu
        denom = safe_sqrt(exp_avg_sq / bias_correction2) + eps
        mu_product_next = mu_product * mu_next
        p = p - lr * (1.0 - mu) / (1.0 - mu_product) * g / denom
        p = p - lr * mu_next / (1.0 - mu_product_next) * exp_avg / denom
        new_s = {
            "step": step,
            "mu_product": mu_product,
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
        }
        return p, new_s


class RAdam(FunctionalOptimizer):
    """RAdam (optional decoupled weight decay), as ``torch.optim.RAdam``."""

    name = "RAdam"
    DEFAULTS = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
        "maximize": False,
    }
    torch_class = torch.optim.RAdam

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        return {"step": 0.0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        p, g, exp_avg, exp_avg_sq, step = _adam_moments(p, g, s, hp)
        lr, eps = hp["lr"], hp["eps"]
        beta1, beta2 = hp["betas"]
        bias_correction1 = 1 - _pow(beta1, step)
        bias_correction2 = 1 - _pow(beta2, step)
        bias_corrected_exp_avg = exp_avg / bias_correction1
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * _pow(beta2, step) / bias_correction2
        new_s = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        # The branch is taken on the value; a tensor beta2 still gets its gradient through rho_t.
        if float(rho_t) > 5.0:
            rect = _sqrt_scalar(
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            )
            adaptive = _sqrt_scalar(bias_correction2) / (safe_sqrt(exp_avg_sq) + eps)
            return p - bias_corrected_exp_avg * lr * adaptive * rect, new_s
        return p - bias_corrected_exp_avg * lr, new_s


class Adadelta(FunctionalOptimizer):
    """Adadelta (weight decay, ``maximize``), as ``torch.optim.Adadelta``.

    References:
        Zeiler, "ADADELTA: An Adaptive Learning Rate Method", 2012.
    """

    name = "Adadelta"
    DEFAULTS = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}
    torch_class = torch.optim.Adadelta

    def validate(self, hp: Hyper) -> None:
        super().validate(hp)
        rho = hp.get("rho")
        if isinstance(rho, (int, float)) and not 0.0 <= rho <= 1.0:
            raise ValueError(f"{self.name}: invalid rho value {rho}; need 0 <= rho <= 1")

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        return {"step": 0.0, "square_avg": torch.zeros_like(p), "acc_delta": torch.zeros_like(p)}

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        g = _grad_with_decay(p, g, hp)
        rho, eps = hp["rho"], hp["eps"]
        square_avg = s["square_avg"] * rho + (1 - rho) * g * g
        # safe_sqrt: with eps = 0 (or a learned eps reaching 0) a zero accumulator would make
        # sqrt's derivative infinite; the values are those of plain sqrt.
        std = safe_sqrt(square_avg + eps)
        delta = safe_sqrt(s["acc_delta"] + eps) / std * g
        acc_delta = s["acc_delta"] * rho + (1 - rho) * delta * delta
        new_s = {"step": s["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}
        return p - hp["lr"] * delta, new_s


class ASGD(FunctionalOptimizer):
    """Averaged SGD (weight decay, ``maximize``), as ``torch.optim.ASGD``.

    The state's ``eta`` (the decayed step size) starts as the group's ``lr`` itself, so a tensor
    ``lr`` gets its hypergradient through every later step size, as it should. ``ax`` (the
    running average of the iterates) is kept as torch keeps it; it is not the fast weight.

    References:
        Polyak and Juditsky, "Acceleration of Stochastic Approximation by Averaging", 1992.
    """

    name = "ASGD"
    DEFAULTS = {
        "lr": 1e-2,
        "lambd": 1e-4,
        "alpha": 0.75,
        "t0": 1e6,
        "weight_decay": 0.0,
        "maximize": False,
    }
    torch_class = torch.optim.ASGD

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        return {"step": 0.0, "eta": hp["lr"], "mu": 1.0, "ax": torch.zeros_like(p)}

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        g = _grad_with_decay(p, g, hp)
        lr, lambd, alpha = hp["lr"], hp["lambd"], hp["alpha"]
        step, eta, mu = s["step"] + 1, s["eta"], s["mu"]
        p = p * (1 - lambd * eta) - eta * g
        # torch copies the iterate while mu == 1 (before t0) and averages afterwards.
        ax = p if float(mu) == 1.0 else s["ax"] + (p - s["ax"]) * mu
        new_s = {
            "step": step,
            "eta": lr / _pow(1 + lambd * lr * step, alpha),
            "mu": 1.0 / max(1.0, step - float(hp["t0"])),
            "ax": ax,
        }
        return p, new_s

    def state_from_torch(self, torch_state: Mapping[str, Any], p: Tensor) -> ParamState:
        out = super().state_from_torch(torch_state, p)
        # torch keeps eta and mu as 0-d tensors of the default dtype; our rule treats them as
        # numbers (mu only selects copy vs. average, eta is a plain step size).
        for key in ("eta", "mu"):
            if key in out:
                out[key] = float(out[key])
        return out


class Rprop(FunctionalOptimizer):
    """Rprop (``maximize``), as ``torch.optim.Rprop``.

    The update uses only the gradient's sign, so second-order terms are (correctly) zero: the
    new weights depend on the old ones through the identity, and a tensor ``lr`` or ``etas``
    gets its hypergradient through the per-element step sizes.

    References:
        Riedmiller and Braun, "A Direct Adaptive Method for Faster Backpropagation Learning:
        The RPROP Algorithm", 1993.
    """

    name = "Rprop"
    DEFAULTS = {
        "lr": 1e-2,
        "etas": (0.5, 1.2),
        "step_sizes": (1e-6, 50.0),
        "maximize": False,
    }
    torch_class = torch.optim.Rprop

    def validate(self, hp: Hyper) -> None:
        super().validate(hp)
        etaminus, etaplus = hp["etas"]
        if (
            isinstance(etaminus, (int, float))
            and isinstance(etaplus, (int, float))
            and not 0.0 < etaminus < 1.0 < etaplus
        ):
            raise ValueError(
                f"{self.name}: invalid etas {(etaminus, etaplus)}; need 0 < etaminus < 1 < etaplus"
            )

    def init_param(self, p, hp):  # type: ignore[no-untyped-def]
        # zeros + lr rather than full_like: a tensor lr stays in the graph.
        step_size = torch.zeros_like(p) + hp["lr"]
        return {"step": 0.0, "prev": torch.zeros_like(p), "step_size": step_size}

    def update_param(self, p, g, s, hp):  # type: ignore[no-untyped-def]
        if hp.get("maximize"):
            g = -g
        etaminus, etaplus = hp["etas"]
        step_size_min, step_size_max = hp["step_sizes"]
        agreement = g * s["prev"]
        factor = torch.where(
            agreement > 0,
            etaplus,
            torch.where(agreement < 0, etaminus, torch.ones_like(agreement)),
        )
        step_size = (s["step_size"] * factor).clamp(step_size_min, step_size_max)
        # After a sign change the step is skipped and the next comparison starts from zero.
        g = torch.where(agreement < 0, torch.zeros_like(g), g)
        # prev only enters through sign(), whose derivative is 0: detaching it frees the graph.
        new_s = {"step": s["step"] + 1, "prev": g.detach(), "step_size": step_size}
        return p - g.sign() * step_size, new_s


@dataclass(frozen=True)
class Registration:
    """What the registry holds for one ``torch.optim`` type.

    Attributes:
        functional: the pure update rule (this module).
        differentiable: the ``higher``-compatible class registered for this type with
            :func:`metarun.unroll.diffopt.register_optim`, or ``None``: the generic
            ``DifferentiableOptimizer`` over ``functional``. Only the higher layer reads it (the
            functional layer cannot import that layer, hence the plain ``type``).
    """

    functional: type[FunctionalOptimizer]
    differentiable: type | None = None


REGISTRY: dict[type[torch.optim.Optimizer], Registration] = {
    cls.torch_class: Registration(cls)  # type: ignore[misc]
    for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD, Rprop)
}
"""The one optimizer registry: ``torch.optim`` type -> its differentiable counterparts. Both
layers read it (:func:`functional_for`; ``get_diff_optim`` / ``create_diff_optim`` of the higher
layer) and both register into it through :func:`register_functional` (``register_optim`` of the
higher layer is a thin name over it)."""


def register_functional(
    torch_class: type[torch.optim.Optimizer],
    functional: type[FunctionalOptimizer],
    *,
    differentiable: type | None = None,
) -> None:
    """Makes ``functional`` the differentiable counterpart of ``torch_class`` (the one register
    function; a later registration of the same type replaces the earlier one).

    Args:
        torch_class: a ``torch.optim.Optimizer`` subclass.
        functional: a :class:`FunctionalOptimizer` subclass with the same update rule.
        differentiable: the higher-compatible class ``get_diff_optim`` should build for this type
            (``None``: the generic one over ``functional``); higher's ``register_optim`` passes it.

    Raises:
        TypeError: when ``torch_class`` or ``functional`` is not a class of the expected kind.
    """
    if not (isinstance(torch_class, type) and issubclass(torch_class, torch.optim.Optimizer)):
        raise TypeError(
            f"register_functional: torch_class must be a torch.optim.Optimizer subclass, got "
            f"{torch_class!r}"
        )
    if not (isinstance(functional, type) and issubclass(functional, FunctionalOptimizer)):
        raise TypeError(
            f"register_functional: functional must be a FunctionalOptimizer subclass, got "
            f"{functional!r}"
        )
    REGISTRY[torch_class] = Registration(functional, differentiable)


def registration_for(cls: type, *, exact: bool) -> Registration:
    """The registry entry for ``cls``: its own, or (``exact=False``) that of its nearest
    registered base class.

    Exact type first: AdamW may subclass Adam in recent torch and must not fall back to it.

    Raises:
        TypeError: naming the unsupported type, the supported ones and how to register one.
    """
    entry = REGISTRY.get(cls)
    if entry is None and not exact:
        entry = next((REGISTRY[b] for b in cls.__mro__[1:] if b in REGISTRY), None)
    if entry is None:
        supported = ", ".join(sorted(c.__name__ for c in REGISTRY))
        raise TypeError(
            f"No differentiable version of optimizer type {cls.__module__}.{cls.__name__}. "
            f"Supported: {supported}. Register one with "
            "metarun.unroll.register_functional(torch_class, functional_class), or with "
            "higher's metarun.unroll.register_optim(optim_type, diff_optim_type): both fill "
            "the same registry."
        )
    return entry


def functional_for(optimizer: torch.optim.Optimizer | type) -> type[FunctionalOptimizer]:
    """The functional optimizer class matching a ``torch.optim`` optimizer (instance or class);
    a subclass of a registered type gets that type's rule.

    Raises:
        TypeError: naming the unsupported type and listing the supported ones.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    return registration_for(cls, exact=False).functional
