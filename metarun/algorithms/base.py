"""The base class every meta-learning algorithm extends; the runner knows only this class.

An algorithm overrides the four methods that define it (``meta_train_step``, ``evaluate``,
``adapt``, ``predict``); every other hook has a default that does nothing, so the runner calls
them unconditionally and never probes for attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.parallel import Shards
from metarun.tasks import TaskBatch


class MetaAlgorithm(nn.Module):
    """What the runner calls. Algorithms are ``nn.Module`` s so ``state_dict`` covers everything
    they learn (the model's initial weights and e.g. learned inner learning rates).

    Required:

    - ``meta_train_step(batch)`` computes the meta-loss of a batch of tasks and runs its backward,
      leaving the mean over tasks of the meta-gradient in ``.grad`` of ``meta_parameters()``. It
      does not step an optimizer. Returns scalar metrics keyed ``train/<name>``, among them
      ``train/meta_loss`` (what the meta-optimizer minimises): floats, or better 0-d tensors
      left on the device (the runner reads those only on the steps it logs).
    - ``evaluate(batch, inner_steps)`` adapts each task without building a meta-graph and returns
      per-task metrics keyed ``pre/<name>`` and ``post/<name>`` (before/after adaptation), each a
      1-D tensor of length ``len(batch)``: ``loss`` always, ``accuracy`` for classification.
      Algorithms that adapt nothing (example reweighting: ``l2rw``, ``erm``) return ``post/``
      metrics only, one value per query example.
    - ``adapt(support_x, support_y, steps)`` adapts to one task (no task dimension) and returns
      what ``predict(adapted, x)`` needs (fast weights for MAML, prototypes for ProtoNets).

    Hooks with no-op defaults:

    - ``log_scalars()`` / ``log_histograms()``: extra values for logged steps.
    - ``log_curves()``: curves for logged steps, ``{tag: (x, y)}`` of 1-D tensors (e.g.
      Meta-Weight-Net's learned weight against loss); plotted to TensorBoard and a PNG.
    - ``attach_optimizer(optimizer)``: the runner's optimizer (L2RW's look-ahead steps it).
    - ``set_shards(shards)``: under torch.distributed, for algorithms that split each step's
      examples themselves (``splits_examples = True``); the others get their share of the
      meta-batch's tasks from the runner.
    - ``before_training(sample, device)``: once before the first step of a fresh run, with a
      function drawing meta-batches (from its own generator: training tasks are unaffected);
      e.g. MAML measures its task batching there.
    - ``use_compile(backend)``: ``compile=true``: put the meta-step's hot function through
      ``torch.compile`` (see :mod:`metarun.algorithms.compiled`); returns whether the algorithm
      has such a path (the runner warns when it has not).
    - ``extra_state()`` / ``load_extra_state(state)``: run state outside ``state_dict`` that a
      resumed run must reuse (MAML's measured task batching), saved in checkpoints.
    - ``set_step(step)``: the number of completed outer steps, given by the runner before each
      ``meta_train_step`` (also after a resume: the runner restores the step), for schedules
      over the outer steps (MAML++'s loss weights and derivative-order annealing).
    - ``curve_steps(inner_steps)`` / ``evaluate_curve(batch, steps)``: the test's metrics
      against adaptation steps (``eval.curve_steps``); by default no steps, and one
      ``evaluate`` per step count (:class:`~metarun.algorithms.episodic.EpisodicAlgorithm`
      gives its own).

    Attributes:
        model: the network.
        pre_adaptation_metrics: the runner sets it before each step: whether that step is
            logged, so that metrics costing extra work (pre-adaptation query loss) are computed
            only then.
    """

    model: nn.Module
    splits_examples: ClassVar[bool] = False
    pre_adaptation_metrics: bool = True

    def meta_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def meta_train_step(self, batch: TaskBatch) -> Mapping[str, float | Tensor]:
        raise NotImplementedError

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        raise NotImplementedError

    def eval_steps(self, inner_steps: int | None) -> int | None:
        """The adaptation steps of an evaluation asked for ``inner_steps`` (None: the
        algorithm's default; None back: it adapts nothing)."""
        return inner_steps

    def curve_steps(self, inner_steps: int | None) -> list[int]:
        """The step counts of the test's curve when ``eval.curve_steps`` is null, for a test
        with ``inner_steps`` adaptation steps (:meth:`eval_steps`): none by default."""
        return []

    def evaluate_curve(
        self, batch: TaskBatch, steps: Sequence[int]
    ) -> dict[int, dict[str, Tensor]]:
        """:meth:`evaluate` after each of ``steps`` (ascending, distinct) adaptation steps:
        ``{k: evaluate(batch, k)}``, here one ``evaluate`` per step count."""
        return {k: self.evaluate(batch, k) for k in steps}

    # -- hooks with no-op defaults -----------------------------------------------------------
    def log_scalars(self) -> dict[str, float]:
        return {}

    def log_histograms(self) -> dict[str, Tensor]:
        return {}

    def log_curves(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {}

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        return None

    def set_shards(self, shards: Shards) -> None:
        return None

    def before_training(self, sample: Callable[[], TaskBatch], device: torch.device) -> None:
        return None

    def set_step(self, step: int) -> None:
        return None

    def use_compile(self, backend: str) -> bool:
        return False

    def extra_state(self) -> dict[str, Any] | None:
        return None

    def load_extra_state(self, state: dict[str, Any] | None) -> None:
        return None
