"""Task batching as its own part: how a gradient-based algorithm runs the tasks of a meta-batch.

An algorithm writes what it computes for one task, twice at most: ``one_task`` (autograd, one
task at a time) and ``make_batched()`` (the same under ``torch.func.vmap``, a chunk of tasks as
one computation). :class:`TaskBatchingMixin` runs them as ``algo.task_batching`` says:

- ``loop``: task after task, each task's graph freed before the next (least memory);
- ``vmap``: ``algo.task_chunk_size`` tasks at a time (speed for memory);
- ``auto``: the loop until :meth:`~TaskBatchingMixin.before_training` times the candidates on a
  real meta-batch and keeps the fastest (:mod:`metarun.algorithms.autotune`); the choice is
  saved in checkpoints (:meth:`~TaskBatchingMixin.extra_state`) so that a resumed run computes
  as before;
- ``compile=true``: the vmapped function through ``torch.compile``
  (:class:`~metarun.algorithms.compiled.CompiledOrEager`).

Both paths accumulate ``loss / n`` of every task into the parameters' ``.grad`` (the mean
meta-gradient) and hand each task's or chunk's outputs to the algorithm's metric hook. An
algorithm whose meta-gradient is not the gradient of a loss (iMAML's implicit one, solved per
task) returns what it computed in place of the loss and overrides
:meth:`~TaskBatchingMixin.accumulate_meta_gradient`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metarun.algorithms.compiled import CompiledOrEager
from metarun.spec.enums import TaskBatching
from metarun.tasks import TaskBatch

#: ``(sx, sy, qx, qy) -> (meta_loss, query_output)`` for one task (no task dimension).
OneTask = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
#: ``(chunk) -> (meta_losses (T,), query_outputs (T, ...))`` for a chunk of tasks.
BatchedTasks = Callable[[TaskBatch], tuple[Tensor, Tensor]]
#: ``(tasks, losses (T,), outputs (T, ...), batched)``: metrics of one task (``batched=False``,
#: T = 1) or of a vmapped chunk, under ``no_grad``.
OnTasks = Callable[[TaskBatch, Tensor, Tensor, bool], None]


class TaskBatchingMixin:
    """Task batching state and loop, mixed into an algorithm (an ``nn.Module``).

    Attributes:
        task_batching: ``loop``, ``vmap`` or ``auto`` (until measured).
        task_chunk_size: tasks per vmapped chunk (``None``: the whole meta-batch).
        memory_budget_mb: ``auto`` skips candidates whose step would need more.
    """

    task_batching: TaskBatching = TaskBatching.loop
    task_chunk_size: int | None = None
    memory_budget_mb: float | None = None
    _compiled_step: CompiledOrEager | None = None

    def init_task_batching(
        self,
        mode: TaskBatching | str,
        chunk_size: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> None:
        """Args: as the attributes. The values are checked by the algorithm's schema (e.g.
        :class:`~metarun.algorithms.maml.MAMLConfig`: vmap needs batch statistics and no
        ``checkpoint_inner``)."""
        self.task_batching = TaskBatching(mode)
        self.task_chunk_size = chunk_size
        self.memory_budget_mb = memory_budget_mb
        self._compiled_step = None

    # -- runner hooks ------------------------------------------------------------------------
    def before_training(self, sample: Callable[[], TaskBatch], device: torch.device) -> None:
        """``task_batching=auto``: time loop / vmap / vmap chunks on one meta-batch and keep the
        fastest within ``memory_budget_mb``."""
        if self.task_batching is not TaskBatching.auto:
            return
        from metarun.algorithms.autotune import choose_task_batching

        choose_task_batching(self, sample(), device, memory_budget_mb=self.memory_budget_mb)

    def extra_state(self) -> dict[str, Any]:
        """The task batching in use (what ``auto`` chose), so that a resumed run computes as
        before."""
        return {"task_batching": {"mode": self.task_batching.value, "chunk": self.task_chunk_size}}

    def load_extra_state(self, state: dict[str, Any] | None) -> None:
        chosen = (state or {}).get("task_batching")
        if chosen is not None:
            self.task_batching = TaskBatching(chosen["mode"])
            self.task_chunk_size = chosen["chunk"]

    def compile_batched(self, batched: Callable[..., Any], what: str, backend: str) -> bool:
        """``compile=true``: ``batched`` (the vmapped per-task function) through
        ``torch.compile``; the loop stays eager."""
        if self.task_batching is TaskBatching.loop:
            return False
        self._compiled_step = CompiledOrEager(batched, what, backend)
        return True

    def accumulate_meta_gradient(self, losses: Tensor, n: int, *, batched: bool) -> None:
        """Add one task's (``batched=False``: a scalar) or one chunk's (``(T,)``) share of the mean
        meta-gradient over ``n`` tasks to ``.grad``: the backward of their meta-losses over
        ``n``."""
        (losses.sum() / n if batched else losses / n).backward()

    # -- the loop ------------------------------------------------------------------------------
    def run_tasks(
        self,
        batch: TaskBatch,
        one_task: OneTask,
        make_batched: Callable[[], BatchedTasks],
        on_tasks: OnTasks,
    ) -> None:
        """Backward of the mean meta-loss over ``batch``, task by task or chunk by chunk; the
        metric hook sees every task once. ``make_batched`` is called once per step, and only
        when vmapping (it gathers the step's shared arguments)."""
        n = len(batch)
        if self.task_batching is TaskBatching.vmap:
            batched_tasks = make_batched()
            for chunk in batch.split(self.task_chunk_size or n):
                losses, outs = batched_tasks(chunk)
                self.accumulate_meta_gradient(losses, n, batched=True)
                with torch.no_grad():
                    on_tasks(chunk, losses.detach(), outs.detach(), True)
            return
        for task in batch.split(1):
            loss, out = one_task(*(t[0] for t in task.tensors()))
            self.accumulate_meta_gradient(loss, n, batched=False)
            with torch.no_grad():
                on_tasks(task, loss.detach()[None], out.detach()[None], False)
