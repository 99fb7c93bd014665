"""Prototypical Networks: few-shot classification by distances to class-mean embeddings.

There is no inner loop. A task's support examples are embedded, each class's prototype is the
mean of its support embeddings, and a query is classified by a softmax over the negative squared
Euclidean distances to the prototypes; the loss is the cross-entropy of that softmax. The outer
loop meta-learns the embedding network, so the meta-gradient is the ordinary gradient of the
query loss (through the prototypes as well as the query embeddings).

The embedding network is the model without its classification head: ``algo.embedding_head``
names the module that is replaced by ``nn.Identity`` (null: the last ``nn.Linear``; for
``Conv4`` the ``classifier``, leaving ``features`` + flatten). The head's output size, e.g.
``model.num_classes``, is then unused, which is what lets ProtoNets train with more classes per
task than it tests with (``dataset.eval_n_way``).

References:
    Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.

Example::

    algo = ProtoNets(Conv4(num_classes=5))           # embedding: Conv4 without its classifier
    meta_opt = torch.optim.Adam(algo.meta_parameters(), lr=1e-3)
    meta_opt.zero_grad(); algo.meta_train_step(batch); meta_opt.step()
    logits = algo.predict(algo.adapt(support_x, support_y), query_x)   # (Q, N)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun import registry
from metarun.algorithms.episodic import EpisodicAlgorithm, with_meta_loss
from metarun.algorithms.heads import find_head
from metarun.registry import BuildContext, register
from metarun.spec.bases import AlgoSchema
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch


@dataclass
class ProtoNetsConfig(AlgoSchema):
    """``algo=protonets``: Snell et al. 2017."""

    task_types: ClassVar[tuple[str, ...]] = ("classification",)  # distances to class prototypes

    # The module of the model dropped to make the embedding network (replaced by nn.Identity),
    # by its name in model.named_modules(); null = the last nn.Linear (Conv4: classifier).
    embedding_head: str | None = None

    @property
    def eval_inner_steps(self) -> int:
        """Prototypes are computed, not trained: no gradient steps at evaluation."""
        return 0

    def check_run(self, run: Any) -> None:
        name = registry.option_of("algo", self).name
        if run.eval.inner_steps not in (None, 0):
            raise ConfigError(
                f"eval.inner_steps must be null or 0 for algo={name} (prototypes take no "
                f"gradient steps), got {run.eval.inner_steps} (set eval.inner_steps=null)"
            )
        if run.eval.curve_steps:  # null (the default) gives protonets no curve
            raise ConfigError(
                f"eval.curve_steps must be empty for algo={name} (there are no inner steps to "
                f"plot accuracy against), got {list(run.eval.curve_steps)} "
                "(set eval.curve_steps=[])"
            )


@register("algo", "protonets", ProtoNetsConfig)
class ProtoNets(EpisodicAlgorithm):
    """Prototypical Networks (Snell et al. 2017) with squared Euclidean distance.

    Training embeds each task's support and query sets in one forward (normalisation layers in
    training mode see the whole episode); evaluation, :meth:`adapt` and :meth:`predict` run the
    embedding in eval mode (BatchNorm with its running statistics, as the authors' code does at
    test time), so a query's logits do not depend on the other queries.

    Args:
        model: the network; the module named ``embedding_head`` is replaced in place by
            ``nn.Identity`` and the rest is the embedding network ``x -> (B, D)``.
        embedding_head: dotted module name in ``model.named_modules()``; ``None``: the last
            ``nn.Linear``.

    Raises:
        ConfigError: no module of that name, or (``None``) the model has no ``nn.Linear``; the
            message names ``algo.embedding_head`` and the modules there are.
    """

    task_type = "classification"  # distances to class prototypes

    def __init__(self, model: nn.Module, *, embedding_head: str | None = None) -> None:
        super().__init__()
        self.embedding_head = _drop_head(model, embedding_head)
        self.model = model

    @classmethod
    def from_config(
        cls, config: ProtoNetsConfig, model: nn.Module, context: BuildContext
    ) -> ProtoNets:
        if context.task_type != "classification":  # check_run refuses it first, naming keys
            raise ConfigError(
                f"algo=protonets needs a classification dataset, got a {context.task_type} one"
            )
        return cls(model, embedding_head=config.embedding_head)

    # -- the computation ---------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """``(B, *input_shape) -> (B, D)`` embeddings (flattened after the embedding network)."""
        return self.model(x).flatten(1)

    @staticmethod
    def prototypes(support_z: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        """Class means ``(N, D)`` of support embeddings ``(S, D)`` with labels ``(S,)``."""
        one_hot = F.one_hot(support_y, n_way).to(support_z.dtype)  # (S, N)
        counts = one_hot.sum(0)  # (N,)
        return (one_hot.T @ support_z) / counts.unsqueeze(1)  # (N, D)

    @staticmethod
    def logits(query_z: Tensor, prototypes: Tensor) -> Tensor:
        """Negative squared Euclidean distances ``(Q, N)`` of queries ``(Q, D)`` to prototypes
        ``(N, D)`` (the difference form: exact, unlike the expanded ``|a|^2 - 2ab + |b|^2``)."""
        return -(query_z.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)

    def _episode(self, sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
        """Query logits of one task, support and query embedded in one forward."""
        n_way = _n_way(sy)
        z = self.embed(torch.cat([sx, qx]))  # (S + Q, D)
        support_z, query_z = z[: len(sx)], z[len(sx) :]
        return self.logits(query_z, self.prototypes(support_z, sy, n_way))

    @staticmethod
    def _metrics(logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {
            "loss": F.cross_entropy(logits, y).detach(),
            "accuracy": (logits.argmax(-1) == y).float().mean(),
        }

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """Gradient of the mean query loss over the batch's episodes (Snell et al.: one episode
        per step, i.e. ``meta_batch_size=1``), accumulated task by task."""
        n = len(batch)
        totals: dict[str, Any] = {}
        for i in range(n):
            sx, sy, qx, qy = (t[i] for t in batch.tensors())
            logits = self._episode(sx, sy, qx)
            (F.cross_entropy(logits, qy) / n).backward()
            with torch.no_grad():
                for key, value in self._metrics(logits.detach(), qy).items():
                    name = f"train/post_{key}"
                    # Summed on the device: the runner reads them on logged steps only.
                    totals[name] = totals.get(name, 0.0) + value.detach().double() / n
        # No adaptation before the prototypes, so no train/pre_* metrics.
        return with_meta_loss(totals)

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor | None, Tensor]:
        """No ``pre/`` output: before its prototypes a task has no classifier (chance by
        construction)."""
        _check_steps(steps)
        with torch.no_grad():
            return None, self.logits(self.embed(qx), self._adapt(sx, sy))

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """``{"prototypes": (N, D)}`` for one task (no task dimension); labels in ``[0, N)``.

        Raises:
            ValueError: ``steps`` other than ``None``/0, or a class in ``[0, N)`` without
                support examples.
        """
        _check_steps(steps)
        with self.eval_mode(), torch.no_grad():
            return {"prototypes": self._adapt(support_x, support_y)}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``(Q, N)``: negative squared distances of ``x``'s embeddings to the
        prototypes of :meth:`adapt`."""
        with self.eval_mode(), torch.no_grad():
            return self.logits(self.embed(x), params["prototypes"])

    def _adapt(self, sx: Tensor, sy: Tensor) -> Tensor:
        return self.prototypes(self.embed(sx), sy, _n_way(sy))

    def eval_training_mode(self) -> bool:
        # BatchNorm with its running statistics at test time, as the authors' code does.
        return False


def _n_way(labels: Tensor) -> int:
    """Classes of a task whose labels are ``0..N-1``, each with at least one example."""
    n_way = int(labels.max()) + 1
    missing = sorted(set(range(n_way)) - set(labels.unique().tolist()))
    if missing:
        raise ValueError(
            f"support labels must cover every class 0..{n_way - 1} (a prototype per class), "
            f"got none for {missing}; relabel the support set's classes as 0..N-1"
        )
    return n_way


def _check_steps(steps: int | None) -> None:
    if steps not in (None, 0):
        raise ValueError(
            f"ProtoNets takes no inner gradient steps, got steps={steps} (pass steps=None)"
        )


def _drop_head(model: nn.Module, name: str | None) -> str:
    """Replace the module ``name`` of ``model`` (``None``: the last ``nn.Linear``) by
    ``nn.Identity``; returns the name replaced."""
    name = find_head(model, name, key="algo.embedding_head", role="drops")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, nn.Identity())
    return name
