"""MAML++'s parts (Antoniou, Edwards & Storkey 2019), which MAML composes: the step-by-step inner
loop (:class:`StepwiseLoop`) with the multi-step loss (:func:`msl_weights`) and per-step
BatchNorm weights and statistics (:class:`PerStepBatchNorm`); per-layer per-step rates are
:class:`metarun.algorithms.inner_rates.InnerRates`' ``per_layer_per_step``. The options are keys
of :class:`metarun.algorithms.maml.MAMLConfig` (``algo.multi_step_loss``,
``algo.learn_inner_lr=per_layer_per_step``, ``algo.per_step_bn``, ``algo.first_order_until``),
checked here (:func:`check_options`, :func:`check_run_options`); ``algo=mamlpp``
(:mod:`metarun.algorithms.mamlpp`) turns them on. MAML holds a :class:`StepwiseLoop` when any of
them is on and runs its original loops otherwise.

References:
    Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from metarun import registry
from metarun.algorithms.inner_loop import InnerLoopConfig
from metarun.spec.checks import require, require_optional_count
from metarun.spec.enums import BNPolicy, InnerLR
from metarun.spec.errors import ConfigError
from metarun.unroll import GradBackend, functional_call, get_params, inner_loop
from metarun.unroll.batched import func_inner_loop
from metarun.unroll.optimizers import Params

# Antoniou et al.'s code keeps every non-final step at a small share of the loss while
# annealing (0.03 split over the steps), so that no step's loss vanishes before the switch to
# the final step only.
MSL_FLOOR = 0.03


def msl_weights(steps: int, outer_step: int, anneal_steps: int) -> list[float] | None:
    """Per-step importance of the query losses after each inner step (multi-step loss).

    At outer step 0 every inner step's query loss weighs ``1/steps``. Over ``anneal_steps``
    outer steps each non-final weight falls linearly towards ``MSL_FLOOR / steps`` and the final
    one rises by what they lose (the weights always sum to 1); from ``anneal_steps`` on, only
    the final step's loss counts, signalled by ``None`` (the caller then computes no
    intermediate query loss).

    Args:
        steps: inner steps (>= 1).
        outer_step: completed outer steps.
        anneal_steps: outer steps of annealing (>= 1).

    Returns:
        ``steps`` floats summing to 1, or ``None`` once annealing is over.

    References:
        Antoniou et al. 2019, Sec. 4, "Multi-Step Loss Optimization (MSL)".
    """
    if outer_step >= anneal_steps:
        return None
    progress = outer_step / anneal_steps
    floor = MSL_FLOOR / steps
    non_final = max((1.0 - progress) / steps, floor)
    return [non_final] * (steps - 1) + [1.0 - (steps - 1) * non_final]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _slot(step: int, name: str) -> str:
    # ParameterDict keys and buffer names may not contain dots.
    return f"step{step}__" + name.replace(".", "__")


class PerStepBatchNorm(nn.Module):
    """Per-inner-step copies of a model's BatchNorm affine weights (meta-learned) and running
    statistics (buffers).

    Step 0 is the model's own weights and buffers; steps ``1 .. steps-1`` are copies held here
    (so ``state_dict`` and checkpoints carry them), initialised from the model's. An inner step
    ``t >= steps`` (evaluation with more steps than training) uses the last copy.

    Args:
        model: the network; it must contain BatchNorm layers.
        steps: inner steps in training (copies ``0 .. steps-1``).

    Raises:
        ConfigError: the model has no BatchNorm layer (a ``ValueError`` the CLI reports as a
            usage error).
    """

    def __init__(self, model: nn.Module, steps: int) -> None:
        super().__init__()
        norms = [
            (prefix, m)
            for prefix, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if not norms:
            raise ConfigError(
                f"algo.per_step_bn=true needs a model with BatchNorm layers; "
                f"{type(model).__name__} has none (set algo.per_step_bn=false, or use a model "
                "with BatchNorm, e.g. model=conv4 with model.batch_norm=true)"
            )
        self.steps = steps
        self.affine_names = [
            _join(prefix, k)
            for prefix, m in norms
            for k, p in m.named_parameters(recurse=False)
            if p.requires_grad
        ]
        self.stat_names = [
            _join(prefix, k)
            for prefix, m in norms
            for k, b in m.named_buffers(recurse=False)
            if b is not None
        ]
        self.affine = nn.ParameterDict(
            {
                _slot(t, n): nn.Parameter(model.get_parameter(n).detach().clone())
                for t in range(1, steps)
                for n in self.affine_names
            }
        )
        for t in range(1, steps):
            for n in self.stat_names:
                self.register_buffer(_slot(t, n), model.get_buffer(n).detach().clone())

    def index(self, step: int) -> int:
        """The copy used at inner step ``step`` (the last one beyond the training steps)."""
        return min(step, self.steps - 1)

    def params_at(self, step: int, initial: Params) -> dict[str, Tensor]:
        """Affine weights of inner step ``step``; step 0's are ``initial``'s (the model's own, or
        their copies under ``copy_initial_weights``)."""
        t = self.index(step)
        if t == 0:
            return {n: initial[n] for n in self.affine_names}
        return {n: self.affine[_slot(t, n)] for n in self.affine_names}

    def stats_at(self, model: nn.Module, step: int) -> dict[str, Tensor]:
        """Running statistics of inner step ``step`` (BatchNorm updates them in place when it
        runs in training mode with them)."""
        t = self.index(step)
        if t == 0:
            return {n: model.get_buffer(n) for n in self.stat_names}
        return {n: self.get_buffer(_slot(t, n)) for n in self.stat_names}


def options_on(config: Any) -> list[str]:
    """The MAML++ options a MAML-shaped config turns on, as ``key=value`` overrides."""
    on = [f"algo.{k}=true" for k in ("multi_step_loss", "per_step_bn") if getattr(config, k)]
    if config.learn_inner_lr is InnerLR.per_layer_per_step:
        on.append("algo.learn_inner_lr=per_layer_per_step")
    if config.first_order_until is not None:
        on.append(f"algo.first_order_until={config.first_order_until}")
    return on


def check_options(config: Any) -> None:
    """The checks of the MAML++ keys of a MAML-shaped config, on their own."""
    require(
        config.msl_anneal_steps >= 1,
        "algo.msl_anneal_steps",
        config.msl_anneal_steps,
        ">= 1",
        "algo.msl_anneal_steps=7500",
    )
    require_optional_count(
        "algo.first_order_until", config.first_order_until, "algo.first_order_until=25000"
    )
    if config.first_order and config.first_order_until is not None:
        raise ConfigError(
            f"algo.first_order_until={config.first_order_until} needs second-order MAML, got "
            "algo.first_order=true (every step would be first order; set "
            "algo.first_order=false to anneal, or algo.first_order_until=null)"
        )
    running_stats = config.bn_policy is BNPolicy.running_stats
    if config.per_step_bn and config.checkpoint_inner and running_stats:
        raise ConfigError(
            "algo.per_step_bn=true with algo.bn_policy=running_stats cannot use "
            "algo.checkpoint_inner=true (recomputing a support forward would update the "
            "per-step running statistics twice; set algo.checkpoint_inner=false)"
        )


def check_run_options(config: Any, run: Any) -> None:
    """The MAML++ checks that need the whole run: an algorithm whose own step does not run
    MAML's unroll (``takes_mamlpp_options = False``) refuses them; per-step BatchNorm needs
    BatchNorm layers."""
    on = options_on(config)
    if on and not config.takes_mamlpp_options:
        name = registry.option_of("algo", config).name
        raise ConfigError(
            f"{', '.join(on)}: MAML++ options of algo=maml, not supported by "
            f"algo={name} (remove them, or use algo=maml)"
        )
    if config.per_step_bn and not getattr(run.model, "batch_norm", True):
        raise ConfigError(
            "algo.per_step_bn=true needs BatchNorm layers, got model.batch_norm=false "
            "(set model.batch_norm=true or algo.per_step_bn=false)"
        )


@dataclass
class MAMLPPOptions(InnerLoopConfig):
    """The inner-loop keys plus MAML++'s options, each off by default: the schema base of MAML
    (:class:`~metarun.algorithms.maml.MAMLConfig`) and of what shares its keys."""

    #: Whether the algorithm runs MAML's unroll, where the MAML++ options live.
    takes_mamlpp_options: ClassVar[bool] = True
    #: Keys counting outer steps, with the switch that turns each on (metarun.config.checks).
    schedule_keys: ClassVar[dict[str, str | None]] = {
        "msl_anneal_steps": "multi_step_loss",
        "first_order_until": None,
    }

    # MAML++ (Antoniou et al. 2019, Sec. 4), each off by default; learn_inner_lr=
    # per_layer_per_step is its LSLR. Multi-step loss: the query loss after every inner step,
    # weighted, annealed over msl_anneal_steps outer steps to the final step's alone.
    multi_step_loss: bool = False
    msl_anneal_steps: int = 7500
    # Per-step BatchNorm weights and running statistics (BNWB + BNRS); BN weights are then
    # meta-learned per step and not adapted in the inner loop.
    per_step_bn: bool = False
    # Derivative-order annealing: first order for the first N outer steps, then second order.
    first_order_until: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self)

    def check_run(self, run: Any) -> None:
        check_run_options(self, run)
        super().check_run(run)


class StepwiseLoop:
    """The inner loop one step at a time, as MAML composes it when a MAML++ option is on: step
    ``t``'s rates and BatchNorm copy, and with the multi-step loss the query loss after every
    step, weighted by :func:`msl_weights` at the learner's ``outer_step``.

    Args:
        learner: the MAML learner whose model, loss, inner optimizer, rates, BatchNorm policy,
            derivative order (``_first_order_now()``) and ``outer_step`` it uses.
        bn: per-step BatchNorm (None: the model's own BatchNorm at every step).
        trainable: what the steps update (per-step BatchNorm weights are meta-learned only).
    """

    def __init__(self, learner: Any, bn: PerStepBatchNorm | None, trainable: list[str]) -> None:
        self.learner = learner
        self.bn = bn
        self.trainable = trainable
        self._rate_names = {n: n for n in trainable}
        # Query forwards after adaptation use the last training step's BatchNorm copy, whatever
        # the number of steps (as ``predict`` does, which does not know it).
        self.last_step = learner.inner_steps - 1

    def forward_at(
        self,
        params: Params,
        x: Tensor,
        step: int,
        *,
        support: bool,
        initial: Params | None = None,
    ) -> Tensor:
        """The forward at inner step ``step``: that step's BatchNorm weights (from ``initial``
        for step 0, when given) and running statistics. Only a ``support`` forward in training
        mode writes statistics; a query forward in training normalises with its own batch and
        writes nothing (no leakage into support steps)."""
        learner, bn = self.learner, self.bn
        if bn is None:
            return learner._forward(params, x)  # type: ignore[no-any-return]
        if initial is not None:
            params = {**params, **bn.params_at(step, initial)}
        model = learner.model
        buffers: dict[str, Tensor | None]
        if learner.bn_policy is BNPolicy.batch_stats or (model.training and not support):
            buffers = dict(learner._stats_off)
        else:
            buffers = dict(bn.stats_at(model, step))
        return functional_call(model, params, x, buffers=buffers)

    def pre_forward(self, x: Tensor) -> Tensor:
        """The query forward before adaptation (step 0's BatchNorm copy, writing nothing)."""
        return self.forward_at(get_params(self.learner.model), x, 0, support=False)

    def run(
        self,
        initial: Params,
        sx: Tensor,
        sy: Tensor,
        steps: int,
        *,
        track: bool,
        grad: GradBackend = GradBackend.autograd,
        query: tuple[Tensor, Tensor] | None = None,
        first_step: int = 0,
    ) -> tuple[Params, Tensor | None, Tensor | None]:
        """Adapt ``initial`` on one task's support set.

        Args:
            initial: the initial parameters (the model's own, or copies).
            steps: inner steps (evaluation may run any number, 0 included).
            track: keep the graph of the inner steps (training).
            grad: the inner gradient engine (``func`` under ``vmap``).
            query: ``(qx, qy)`` in training: the meta-loss is then returned.
            first_step: the index of the first step (evaluation continuing an adaptation
                ``initial`` that ran ``first_step`` steps: the rates and BatchNorm copies of
                steps ``first_step ..`` then apply).

        Returns:
            ``(adapted, meta_loss, out)``: the adapted parameters (with the BatchNorm weights
            that query forwards use), and with ``query`` the meta-loss and the final query
            output (else ``None``, ``None``).
        """
        learner, bn = self.learner, self.bn
        weights = None
        if learner.multi_step_loss and query is not None:
            weights = msl_weights(steps, learner.outer_step, learner.msl_anneal_steps)
        first_order = learner._first_order_now()
        params = {n: p for n, p in initial.items() if bn is None or n not in bn.affine_names}
        meta_loss: Tensor | None = None
        for t in range(first_step, first_step + steps):
            step_loss = self._support_loss(sx, sy, t, initial)
            hyper = learner.rates.hyper(self._rate_names, t)
            if grad is GradBackend.func:
                params = func_inner_loop(
                    step_loss, params, learner._optimizer, 1, hyper=hyper,
                    first_order=first_order, trainable=self.trainable,
                )  # fmt: skip
            else:
                params = inner_loop(
                    step_loss, params, learner._optimizer, 1, hyper=hyper,
                    first_order=first_order, track_higher_grads=track,
                    checkpoint=learner.checkpoint_inner and track,
                ).params  # fmt: skip
            if weights is not None and t < steps - 1:
                qx, qy = query  # type: ignore[misc]  # weights imply a query
                out = self.forward_at(params, qx, t, support=False, initial=initial)
                term = weights[t] * learner._loss(out, qy)
                meta_loss = term if meta_loss is None else meta_loss + term
        adapted = params if bn is None else {**params, **bn.params_at(self.last_step, initial)}
        if query is None:
            return adapted, None, None
        qx, qy = query
        out = self.forward_at(adapted, qx, self.last_step, support=False)
        final = learner._loss(out, qy)
        if weights is not None:
            final = weights[-1] * final
        meta_loss = final if meta_loss is None else meta_loss + final
        return adapted, meta_loss, out

    def task(
        self,
        initial: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
        grad: GradBackend = GradBackend.autograd,
    ) -> tuple[Tensor, Tensor]:
        """One training task's meta-loss and query output after adaptation."""
        _, meta_loss, out = self.run(
            initial, sx, sy, self.learner.inner_steps, track=True, grad=grad, query=(qx, qy)
        )
        assert meta_loss is not None and out is not None  # given a query
        return meta_loss, out

    def _support_loss(
        self, sx: Tensor, sy: Tensor, step: int, initial: Params
    ) -> Callable[[Params], Tensor]:
        def inner_loss(p: Params) -> Tensor:
            out = self.forward_at(p, sx, step, support=True, initial=initial)
            return self.learner._loss(out, sy)  # type: ignore[no-any-return]

        return inner_loss
