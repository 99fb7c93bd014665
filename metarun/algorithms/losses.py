"""The loss and metrics of a task by its type, shared by the algorithms that adapt a model:
cross-entropy and accuracy for classification, mean squared error for regression."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def task_loss(task_type: str, out: Tensor, y: Tensor) -> Tensor:
    """Mean loss of predictions ``out`` against targets ``y`` (one task, no task dimension)."""
    if task_type == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def task_metrics(task_type: str, out: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``loss`` (detached) and, for classification, ``accuracy`` of one task."""
    metrics = {"loss": task_loss(task_type, out, y).detach()}
    if task_type == "classification":
        metrics["accuracy"] = (out.argmax(-1) == y).float().mean()
    return metrics


def task_metrics_per_task(task_type: str, out: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-task ``loss`` (and ``accuracy``) of a batch of tasks, ``out`` ``(T, Q, ...)`` against
    ``y`` ``(T, Q, ...)``: one tensor op per metric, whatever the number of tasks."""
    if task_type == "classification":
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        return {
            "loss": loss.view(y.shape).mean(-1),
            "accuracy": (out.argmax(-1) == y).float().mean(-1),
        }
    return {"loss": F.mse_loss(out, y, reduction="none").flatten(1).mean(1)}
