"""What every few-shot algorithm shares: evaluation from one per-task hook, and training metrics
summed on the device.

An algorithm that adapts to tasks (MAML and its relatives, iMAML, Reptile, ProtoNets) extends
:class:`EpisodicAlgorithm` and writes how it handles one task; the loop over a batch, the metrics
(loss, and accuracy for classification, before and after adaptation) and their layout are
written here once::

    class MyAlgorithm(EpisodicAlgorithm):
        def evaluate_task(self, sx, sy, qx, steps):
            adapted = self.adapt(sx, sy, steps)
            return self.predict(self.initial(), qx), self.predict(adapted, qx)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from metarun.algorithms.base import MetaAlgorithm
from metarun.algorithms.losses import task_metrics
from metarun.tasks import TaskBatch


class EpisodicAlgorithm(MetaAlgorithm):
    """Base of the few-shot algorithms: :meth:`evaluate` from :meth:`evaluate_task`.

    Subclasses set ``task_type`` (``"classification"`` or ``"regression"``) and
    ``eval_inner_steps`` (the default adaptation steps at evaluation).
    """

    task_type: str
    eval_inner_steps: int = 0
    #: :meth:`evaluate_task_curve` adapts each task once, recording the outputs on the way:
    #: the default curve (``eval.curve_steps=null``) then has every step count 0..N.
    curve_in_one_pass: ClassVar[bool] = False

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor | None, Tensor]:
        """One task's query outputs before adaptation (``None``: the algorithm has no
        classifier before adapting, e.g. ProtoNets) and after ``steps`` adaptation steps,
        without a meta-graph."""
        raise NotImplementedError

    def eval_steps(self, inner_steps: int | None) -> int:
        """The adaptation steps of an evaluation asked for ``inner_steps`` (None: default)."""
        return self.eval_inner_steps if inner_steps is None else inner_steps

    def evaluate_task_curve(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: Sequence[int]
    ) -> tuple[Tensor | None, list[Tensor]]:
        """One task's query outputs before adaptation and after each of ``steps`` (ascending,
        distinct) adaptation steps, without a meta-graph.

        The contract: after ``k >= 1`` steps, equal to ``evaluate_task(sx, sy, qx, k)``'s (and
        the pre output to any of theirs); after 0 steps, the output before adaptation where
        there is one. The test's headline metrics are read from here when the curve is on.
        This default calls :meth:`evaluate_task` once per step count ``k >= 1`` (``sum(steps)``
        steps in all); an algorithm that can record its outputs along one adaptation of
        ``steps[-1]`` steps overrides it and sets :attr:`curve_in_one_pass`.
        """
        pre: Tensor | None = None
        after: dict[int, Tensor] = {}
        for k in steps:
            if k > 0:
                before, after[k] = self.evaluate_task(sx, sy, qx, k)
                pre = before if pre is None else pre
        if 0 in steps:
            if pre is None:  # no other step count, or no output before adaptation
                pre, after[0] = self.evaluate_task(sx, sy, qx, 0)
            else:  # 0 steps is the model before adaptation: no second pass for it
                after[0] = pre
        return pre, [after[k] for k in steps]

    def curve_steps(self, inner_steps: int | None) -> list[int]:
        """The default curve of a test with ``inner_steps`` adaptation steps ``N``: every step
        count ``0..N`` where :meth:`evaluate_task_curve` adapts once (the curve then costs a
        query forward per point), else ``0, 1, N`` (Finn et al. 2017, Fig. 2's views: one more
        adaptation step per task than the test alone); none without adaptation steps."""
        n = self.eval_steps(inner_steps)
        if n < 1:
            return []
        return list(range(n + 1)) if self.curve_in_one_pass else sorted({0, 1, n})

    def evaluate_curve(
        self, batch: TaskBatch, steps: Sequence[int]
    ) -> dict[int, dict[str, Tensor]]:
        """Per-task ``pre/`` and ``post/`` query metrics after each of ``steps`` (ascending,
        distinct) adaptation steps, from :meth:`evaluate_task_curve`; ``[k]`` equals
        ``evaluate(batch, k)``."""
        rows: dict[int, dict[str, list[Tensor]]] = {k: {} for k in steps}
        with self.eval_mode():
            for i in range(len(batch)):
                sx, sy, qx, qy = (t[i] for t in batch.tensors())
                pre, posts = self.evaluate_task_curve(sx, sy, qx, steps)
                pre_metrics = {} if pre is None else task_metrics(self.task_type, pre, qy)
                for k, post in zip(steps, posts):
                    for prefix, metrics in (
                        ("pre", pre_metrics),
                        ("post", task_metrics(self.task_type, post, qy)),
                    ):
                        for key, value in metrics.items():
                            rows[k].setdefault(f"{prefix}/{key}", []).append(value.float().cpu())
        return {k: {key: torch.stack(v) for key, v in row.items()} for k, row in rows.items()}

    def eval_training_mode(self) -> bool | None:
        """The mode the model evaluates in: ``True`` (batch statistics in normalisation
        layers), ``False`` (``model.eval()``) or ``None`` (as it is)."""
        return None

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in :meth:`eval_training_mode` for the block, then as it was."""
        training = self.eval_training_mode()
        if training is None:
            yield
            return
        was = self.model.training
        self.model.train(training)
        try:
            yield
        finally:
            self.model.train(was)

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task ``pre/`` and ``post/`` query metrics, each a 1-D tensor of ``len(batch)``."""
        steps = self.eval_steps(inner_steps)
        rows: dict[str, list[Tensor]] = {}
        with self.eval_mode():
            for i in range(len(batch)):
                sx, sy, qx, qy = (t[i] for t in batch.tensors())
                pre, post = self.evaluate_task(sx, sy, qx, steps)
                for prefix, out in (("pre", pre), ("post", post)):
                    if out is None:
                        continue
                    for key, value in task_metrics(self.task_type, out, qy).items():
                        rows.setdefault(f"{prefix}/{key}", []).append(value.float().cpu())
        return {k: torch.stack(v) for k, v in rows.items()}


class MetricTotals:
    """Sums of per-task training metrics kept on the device. :meth:`means` leaves them there:
    the runner reads them only on the steps it logs (no host transfer per step, task or
    metric)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, prefix: str, per_task: dict[str, Tensor]) -> None:
        """Adds metrics ``train/<prefix>_<key>`` of one or more tasks (summed over tasks)."""
        for key, values in per_task.items():
            name = f"train/{prefix}_{key}"
            total = values.sum()
            self.sums[name] = self.sums[name] + total if name in self.sums else total

    def means(self, n: int) -> dict[str, Tensor]:
        """The means over ``n`` tasks, as float64 0-d tensors."""
        if len(self.sums) <= 2:
            # Fewer kernels than stacking for the one or two metrics of an unlogged step.
            return {k: v.detach().double() / n for k, v in self.sums.items()}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).detach().double().div(n)
        return dict(zip(names, values.unbind()))


def with_meta_loss(totals: dict[str, Tensor]) -> dict[str, Tensor]:
    """One tag per quantity: ``train/meta_loss`` is the outer objective, the query loss after
    adaptation unless the algorithm reported its own (MAML++'s multi-step loss: then
    ``train/post_loss`` keeps the final step's query loss); ``train/accuracy`` is the query
    accuracy after adaptation, as ``val/accuracy`` and ``test/accuracy`` are."""
    if "train/meta_loss" not in totals:
        totals["train/meta_loss"] = totals.pop("train/post_loss")
    if "train/post_accuracy" in totals:
        totals["train/accuracy"] = totals.pop("train/post_accuracy")
    return totals
