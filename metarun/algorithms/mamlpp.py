"""The pieces of MAML++ that MAML's options use: the multi-step loss weights and per-step batch
normalisation. The options themselves are keys of :class:`metarun.algorithms.maml.MAMLConfig`
(``algo.multi_step_loss``, ``algo.learn_inner_lr=per_layer_per_step``, ``algo.per_step_bn``,
``algo.first_order_until``); this module holds what they need beyond MAML's loop.

References:
    Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, Sec. 4.
"""

from __future__ import annotations

from torch import Tensor, nn

from metarun.spec.errors import ConfigError
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
