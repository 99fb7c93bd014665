"""MAML++ (Antoniou, Edwards & Storkey 2019) as parts MAML composes: the step-by-step inner loop
(:func:`unroll`) with the multi-step loss (:func:`msl_weights`), per-step BatchNorm weights and
statistics (:class:`PerStepBatchNorm`, :func:`step_forward`); per-layer per-step rates are
:class:`metarun.algorithms.inner_rates.InnerRates`' ``per_layer_per_step``. The options are keys
of :class:`metarun.algorithms.maml.MAMLConfig` (``algo.multi_step_loss``,
``algo.learn_inner_lr=per_layer_per_step``, ``algo.per_step_bn``, ``algo.first_order_until``),
``algo=mamlpp`` turns them on.

References:
    Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from metarun.spec.errors import ConfigError
from metarun.unroll import GradBackend, functional_call, inner_loop
from metarun.unroll.batched import func_inner_loop
from metarun.unroll.optimizers import FunctionalOptimizer, Params

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


def step_forward(
    model: nn.Module,
    bn: PerStepBatchNorm,
    stats_off: dict[str, Tensor | None],
    params: Params,
    x: Tensor,
    step: int,
    *,
    batch_stats: bool,
    support: bool,
    initial: Params | None = None,
) -> Tensor:
    """The forward at inner step ``step``: that step's BatchNorm weights (from ``initial`` for
    step 0, when given) and running statistics. Only a ``support`` forward in training mode
    writes statistics; a query forward in training normalises with its own batch and writes
    nothing (no leakage into support steps). ``batch_stats``: never use running statistics."""
    if initial is not None:
        params = {**params, **bn.params_at(step, initial)}
    buffers: dict[str, Tensor | None]
    if batch_stats or (model.training and not support):
        buffers = dict(stats_off)
    else:
        buffers = dict(bn.stats_at(model, step))
    return functional_call(model, params, x, buffers=buffers)


def unroll(
    initial: Params,
    sx: Tensor,
    sy: Tensor,
    steps: int,
    *,
    step_loss: Callable[[int], Callable[[Params], Tensor]],
    query_loss: Callable[[Params, Tensor, Tensor, int, Params], Tensor],
    query_forward: Callable[[Params, Tensor, int], Tensor],
    loss: Callable[[Tensor, Tensor], Tensor],
    optimizer: FunctionalOptimizer,
    hyper_at: Callable[[int], dict[str, object]],
    trainable: Sequence[str],
    bn: PerStepBatchNorm | None,
    last_step: int,
    first_order: bool,
    track: bool,
    checkpoint: bool,
    grad: GradBackend,
    query: tuple[Tensor, Tensor] | None,
    weights: list[float] | None,
) -> tuple[Params, Tensor | None, Tensor | None]:
    """The inner loop one step at a time: step ``t``'s rates (``hyper_at(t)``) and BatchNorm
    copy (``step_loss(t)``), and with the multi-step loss the query loss after every step.

    Args:
        initial: the initial parameters (the model's own, or copies).
        sx, sy: the support set of one task (``step_loss`` closes over it).
        steps: inner steps.
        trainable: what the steps update (per-step BatchNorm weights are meta-learned only).
        last_step: the last training step: query forwards after adaptation use its BatchNorm
            copy, whatever the number of steps (as ``predict`` does, which does not know it).
        grad: the inner gradient engine (``func`` under ``vmap``).
        query: ``(qx, qy)`` in training: the meta-loss is then returned.
        weights: the multi-step loss weights (None: the final step's query loss alone).

    Returns:
        ``(adapted, meta_loss, out)``: the adapted parameters (with the BatchNorm weights that
        query forwards use), and with ``query`` the meta-loss and the final query output (else
        ``None``, ``None``).
    """
    params = {n: p for n, p in initial.items() if bn is None or n not in bn.affine_names}
    meta_loss: Tensor | None = None
    for t in range(steps):
        if grad is GradBackend.func:
            params = func_inner_loop(
                step_loss(t), params, optimizer, 1, hyper=hyper_at(t), first_order=first_order,
                trainable=trainable,
            )  # fmt: skip
        else:
            params = inner_loop(
                step_loss(t), params, optimizer, 1, hyper=hyper_at(t), first_order=first_order,
                track_higher_grads=track, checkpoint=checkpoint,
            ).params  # fmt: skip
        if weights is not None and t < steps - 1:
            qx, qy = query  # type: ignore[misc]  # weights imply a query
            term = weights[t] * query_loss(params, qx, qy, t, initial)
            meta_loss = term if meta_loss is None else meta_loss + term
    adapted = params if bn is None else {**params, **bn.params_at(last_step, initial)}
    if query is None:
        return adapted, None, None
    qx, qy = query
    out = query_forward(adapted, qx, last_step)
    final = loss(out, qy)
    if weights is not None:
        final = weights[-1] * final
    meta_loss = final if meta_loss is None else meta_loss + final
    return adapted, meta_loss, out
