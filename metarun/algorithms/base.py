"""The narrow protocol every meta-learning algorithm implements; the runner knows only this."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from metarun.tasks import TaskBatch


@runtime_checkable
class MetaAlgorithm(Protocol):
    """What the runner calls. Algorithms are ``nn.Module`` s so ``state_dict`` covers everything
    they learn (the model's initial weights and e.g. learned inner learning rates).

    - ``meta_train_step(batch)`` computes the meta-loss of a batch of tasks and runs its backward,
      leaving the mean over tasks of the meta-gradient in ``.grad`` of ``meta_parameters()``. It
      does not step an optimizer. Returns scalar metrics keyed ``train/<name>``.
    - ``evaluate(batch, inner_steps)`` adapts each task without building a meta-graph and returns
      per-task metrics keyed ``pre/<name>`` and ``post/<name>`` (before/after adaptation), each a
      1-D tensor of length ``len(batch)``: ``loss`` always, ``accuracy`` for classification.
      Algorithms that adapt nothing (example reweighting: ``l2rw``, ``erm``) return ``post/``
      metrics only, one value per query example.
    - ``adapt(support_x, support_y, steps)`` adapts to one task (no task dimension) and returns the
      fast parameters; ``predict(params, x)`` runs the model with them.
    - ``log_scalars()`` extra values worth logging (learned inner learning rates, their grads).

    Optional, called by the runner when present: ``log_histograms()`` (name -> tensor, e.g. the
    last example weights of L2RW, logged as TensorBoard histograms) and
    ``attach_optimizer(optimizer)`` (the runner's optimizer, for algorithms whose meta-step
    needs it, e.g. L2RW's look-ahead).
    """

    model: nn.Module

    def meta_parameters(self) -> list[nn.Parameter]: ...

    def meta_train_step(self, batch: TaskBatch) -> dict[str, float]: ...

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]: ...

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]: ...

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor: ...

    def log_scalars(self) -> dict[str, float]: ...

    # Provided by nn.Module; listed so the runner can type-check against the protocol alone.
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...
