"""ANIL (almost no inner loop): MAML whose inner loop adapts only the network's head.

The model splits into a body, whose weights are meta-learned by the outer loop only, and a head
(``algo.head``, by default the last ``nn.Linear``: Conv4's ``classifier``), which every task
adapts from its meta-learned initial weights. As the body is not adapted, its features of the
support and query sets are computed once per task, and the inner loop runs on the head alone;
the meta-gradient still reaches the body through those features (second order: through the
head's inner gradients too). With one inner step on Omniglot's Conv4 this is several times
faster than MAML (scripts/bench_anil.py), and the more inner steps, the larger the gain.

Everything else is MAML's: first order (``algo.first_order``), learned inner learning rates
(only the head's: a scalar, or Meta-SGD's elementwise rates), BatchNorm policies and task
batching (``loop``, ``vmap``, ``auto``).

References:
    Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
    Effectiveness of MAML", ICLR 2020.

Example::

    algo = ANIL(Conv4(num_classes=5), task_type="classification", inner_lr=0.4,
                inner_steps=1, eval_inner_steps=3)           # head: "classifier"
    meta_opt = torch.optim.Adam(algo.meta_parameters(), lr=1e-3)
    meta_opt.zero_grad(); algo.meta_train_step(batch); meta_opt.step()
    logits = algo.predict(algo.adapt(support_x, support_y), query_x)   # (Q, N)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from metarun.algorithms.episodic import with_meta_loss
from metarun.algorithms.heads import find_head
from metarun.algorithms.maml import MAML, MAMLConfig, _key
from metarun.registry import BuildContext, register
from metarun.spec.enums import BNPolicy, TaskBatching
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch
from metarun.unroll import functional_call, get_params, inner_loop
from metarun.unroll.batched import batch_stats_buffers, func_inner_loop
from metarun.unroll.optimizers import Params

log = logging.getLogger(__name__)


@dataclass
class ANILConfig(MAMLConfig):
    """``algo=anil``: Raghu et al. 2020, MAML's keys plus the head the inner loop adapts."""

    # The module adapted in the inner loop, by its name in model.named_modules() (conv4:
    # classifier, mlp: layers.4); null = the model's last nn.Linear.
    head: str | None = None


@register("algo", "anil", ANILConfig)
class ANIL(MAML):
    """ANIL on MAML's machinery: MAML's arguments, plus the head.

    Args:
        model: the network; its module ``head`` must compute the model's output (the last
            module its forward calls), from one input: the body's features.
        head: dotted name in ``model.named_modules()``; ``None``: the last ``nn.Linear``.
        **kwargs: as :class:`~metarun.algorithms.maml.MAML`. ``learn_inner_lr`` learns rates of
            the head's parameters only; ``copy_initial_weights=True`` starts each task's head
            from a detached copy (the head's initial weights are then not meta-learned, the
            body still is).

    Raises:
        ConfigError: ``head`` names no module of ``model`` (the message lists them), or one
            without trainable parameters; at the first forward, a head that does not compute
            the model's output.
    """

    def __init__(self, model: nn.Module, *, head: str | None = None, **kwargs: Any) -> None:
        # MAML warns that copies leave the whole model without a meta-gradient; here only the
        # head's initial weights are copied (warned about below).
        copy_initial_weights = bool(kwargs.pop("copy_initial_weights", False))
        super().__init__(model, copy_initial_weights=False, **kwargs)
        self.copy_initial_weights = copy_initial_weights
        self.head = find_head(model, head, key="algo.head", role="adapts")
        module = self._head_module
        # Head parameters by their names inside the head, e.g. "weight" for "classifier.weight".
        self._head_names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self._head_names:
            raise ConfigError(
                f"algo.head must name a module with trainable parameters, got {self.head!r} "
                f"({type(module).__name__}: nothing to adapt; set e.g. algo.head=null for the "
                "last nn.Linear)"
            )
        self._head_stats_off = batch_stats_buffers(module)
        if self.inner_lrs is not None:  # Meta-SGD rates for the head only
            self.inner_lrs = nn.ParameterDict(
                {
                    _key(f"{self.head}.{n}"): nn.Parameter(
                        torch.full_like(p.detach(), self.base_inner_lr)
                    )
                    for n, p in module.named_parameters()
                    if p.requires_grad
                }
            )
        if copy_initial_weights:
            log.warning(
                "algo.copy_initial_weights=true: each task's head starts from a detached copy, "
                "so the head's initial weights (%s) receive no meta-gradient; the body is still "
                "meta-learned",
                self.head,
            )

    @classmethod
    def init_kwargs(cls, config: MAMLConfig, context: BuildContext) -> dict[str, Any]:
        head = cast(ANILConfig, config).head  # ANIL is registered with ANILConfig only
        return {**super().init_kwargs(config, context), "head": head}

    @property
    def _head_module(self) -> nn.Module:
        # Looked up, not stored: an attribute would register the head twice in state_dict.
        return self.model.get_submodule(self.head)

    # -- the computation ---------------------------------------------------------------------
    def _features(self, params: Params, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, out)``: the head's input for ``x`` (the body's features) and the model's
        output with the head's weights in ``params``."""
        seen: dict[str, Any] = {}

        def take_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen["args"] = args

        def take_output(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            seen["out"] = out

        module = self._head_module
        hooks = [
            module.register_forward_pre_hook(take_input),
            module.register_forward_hook(take_output),
        ]
        try:
            out = self._forward(params, x)
        finally:
            for hook in hooks:
                hook.remove()
        self._check_head(seen, out)
        return seen["args"][0], out

    def _check_head(self, seen: dict[str, Any], out: Tensor) -> None:
        model, module = type(self.model).__name__, type(self._head_module).__name__
        if "args" not in seen:
            raise ConfigError(
                f"algo.head must name a module that {model}'s forward calls, got {self.head!r} "
                f"({module}, never called; set e.g. algo.head=null for the last nn.Linear)"
            )
        if len(seen["args"]) != 1 or not torch.is_tensor(seen["args"][0]):
            raise ConfigError(
                f"algo.head must name a module called with one tensor (the body's features), "
                f"got {self.head!r} ({module}, called with {len(seen['args'])} arguments)"
            )
        if seen["out"] is not out:
            raise ConfigError(
                f"algo.head must name the module that computes {model}'s output (ANIL adapts "
                f"it on the body's features), got {self.head!r} ({module}), after which the "
                "forward computes more (set algo.head to the last module its forward calls, "
                "e.g. algo.head=null for the last nn.Linear)"
            )

    def _head_forward(self, head: Params, features: Tensor) -> Tensor:
        """The head's output with weights ``head`` (keyed by names inside the head)."""
        if self.bn_policy is BNPolicy.batch_stats and self._head_stats_off:
            return functional_call(self._head_module, head, features, buffers=self._head_stats_off)
        return functional_call(self._head_module, head, features)

    def _initial_params(self) -> Params:
        """The model's own weights (they get the meta-gradient); the head's detached copies
        with ``copy_initial_weights``."""
        params = get_params(self.model)
        if self.copy_initial_weights:
            for n in self._head_names:
                p = params[f"{self.head}.{n}"]
                params[f"{self.head}.{n}"] = p.detach().clone().requires_grad_()
        return params

    def _head_of(self, params: Params) -> Params:
        prefix = f"{self.head}."
        return {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}

    def _hyper(self) -> dict[str, object]:
        if self.inner_lrs is not None:
            return {"lr": {n: self.inner_lrs[_key(f"{self.head}.{n}")] for n in self._head_names}}
        return super()._hyper()

    def _adapt_head(
        self,
        head: Params,
        features: Tensor,
        y: Tensor,
        steps: int,
        *,
        track: bool = True,
        batched: bool = False,
    ) -> Params:
        """The head after ``steps`` inner steps on ``(features, y)``; ``batched``: written with
        ``torch.func.grad`` to run under ``vmap``."""

        def inner_loss(h: Params) -> Tensor:
            return self._loss(self._head_forward(h, features), y)

        if batched:
            return func_inner_loop(
                inner_loss,
                head,
                self._optimizer,
                steps,
                hyper=self._hyper(),
                first_order=self.first_order,
            )
        return inner_loop(
            inner_loss,
            head,
            self._optimizer,
            steps,
            hyper=self._hyper(),
            first_order=self.first_order,
            track_higher_grads=track,
            checkpoint=self.checkpoint_inner and track,
        ).params

    def _task(
        self,
        params: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
        batched: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One task: ``(query loss, adapted query output, pre-adaptation query output)``."""
        # First order never differentiates the inner gradient, so nothing flows back through
        # the support features: no graph for them.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.first_order):
            support_features, _ = self._features(params, sx)
        query_features, pre = self._features(params, qx)
        head = self._adapt_head(
            self._head_of(params), support_features, sy, self.inner_steps, batched=batched
        )
        out = self._head_forward(head, query_features)
        return self._loss(out, qy), out, pre.detach()

    def _add_metrics(
        self, totals: dict[str, Tensor], outs: tuple[Tensor, Tensor], y: Tensor, weight: float
    ) -> None:
        """Adds ``weight`` x the metrics of the post- and pre-adaptation outputs ``outs`` for
        targets ``y``. Kept as tensors: one device sync per step, not one per task."""
        for prefix, out in zip(("post", "pre"), outs):
            for key, value in self._metrics(out.detach(), y).items():
                name = f"train/{prefix}_{key}"
                totals[name] = totals[name] + value * weight if name in totals else value * weight

    def use_compile(self, backend: str) -> bool:
        # MAML's compiled vmapped step is not the step ANIL runs: say the run is eager.
        return False

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """Meta-gradient of the mean query loss over the batch (body features once per task,
        inner steps on the head only)."""
        n = len(batch)
        params = self._initial_params()
        totals: dict[str, Tensor] = {}
        if self.task_batching is TaskBatching.vmap:
            batched = torch.func.vmap(
                functools.partial(self._task, batched=True), in_dims=(None, 0, 0, 0, 0)
            )
            for chunk in batch.split(self.task_chunk_size or n):
                losses, outs, pres = batched(params, *chunk.tensors())
                (losses.sum() / n).backward()
                # Tasks of a batch have equally many queries: the mean over all of a chunk's
                # queries is the mean of its task means.
                flat = (outs.flatten(0, 1), pres.flatten(0, 1))
                self._add_metrics(totals, flat, chunk.query_y.flatten(0, 1), len(chunk) / n)
        else:
            for i in range(n):
                sx, sy, qx, qy = (t[i] for t in batch.tensors())
                loss, out, pre = self._task(params, sx, sy, qx, qy)
                (loss / n).backward()
                self._add_metrics(totals, (out, pre), qy, 1 / n)
        return with_meta_loss({k: v.detach() for k, v in totals.items()})

    def evaluate_task(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int
    ) -> tuple[Tensor | None, Tensor]:
        params = get_params(self.model)
        with torch.no_grad():
            support_features, _ = self._features(params, sx)
            query_features, pre = self._features(params, qx)
        head = self._adapt_head(self._head_of(params), support_features, sy, steps, track=False)
        with torch.no_grad():
            return pre, self._head_forward(head, query_features)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """All of the model's weights for one task (no task dimension), without a meta-graph:
        the body's as they are, the head's adapted; :meth:`predict` takes them."""
        steps = self.eval_inner_steps if steps is None else steps
        params = get_params(self.model, copy=True)
        with self.eval_mode():
            with torch.no_grad():
                features, _ = self._features(params, support_x)
            head = self._adapt_head(self._head_of(params), features, support_y, steps, track=False)
        params.update({f"{self.head}.{n}": p for n, p in head.items()})
        return params
