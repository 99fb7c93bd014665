"""ANIL (almost no inner loop): MAML whose inner loop adapts only the network's head.

The model splits into a body, whose weights are meta-learned by the outer loop only, and a head
(``algo.head``, by default the last ``nn.Linear``: Conv4's ``classifier``), which every task
adapts from its meta-learned initial weights. As the body is not adapted, its features of the
support and query sets are computed once per task, and the inner loop runs on the head alone;
the meta-gradient still reaches the body through those features (second order: through the
head's inner gradients too). With one inner step on Omniglot's Conv4 this is several times
faster than MAML (scripts/bench_anil.py), and the more inner steps, the larger the gain.

Its keys are MAML's (first order, learned inner rates of the head: a scalar or Meta-SGD's
elementwise rates, BatchNorm policies), on the same shared parts: task batching
(:mod:`metarun.algorithms.batching`: ``loop``, ``vmap``, ``auto``), evaluation and metrics
(:mod:`metarun.algorithms.episodic`) and the inner rates (:mod:`metarun.algorithms.inner_rates`).
MAML++'s options are MAML's unroll and are refused here.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.episodic import MetricTotals, with_meta_loss
from metarun.algorithms.heads import find_head
from metarun.algorithms.inner_loop import InnerLoopLearner
from metarun.algorithms.inner_rates import InnerRates
from metarun.algorithms.losses import task_metrics_per_task
from metarun.algorithms.maml import MAMLConfig
from metarun.registry import register
from metarun.spec.enums import BNPolicy
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch
from metarun.unroll import functional_call, get_params
from metarun.unroll.batched import batch_stats_buffers
from metarun.unroll.optimizers import Params

log = logging.getLogger(__name__)


@dataclass
class ANILConfig(MAMLConfig):
    """``algo=anil``: Raghu et al. 2020, MAML's keys plus the head the inner loop adapts."""

    # The module adapted in the inner loop, by its name in model.named_modules() (conv4:
    # classifier, mlp: layers.4); null = the model's last nn.Linear.
    head: str | None = None

    takes_mamlpp_options: ClassVar[bool] = False  # its own step, not MAML's unroll


@register("algo", "anil", ANILConfig)
class ANIL(InnerLoopLearner):
    """ANIL: MAML's arguments, plus the head.

    Args:
        model: the network; its module ``algo.head`` must compute the model's output (the last
            module its forward calls), from one input: the body's features.
        config, task_type, keys: as :class:`~metarun.algorithms.maml.MAML`'s, with
            :class:`ANILConfig`; ``learn_inner_lr`` learns rates of the head's parameters only,
            ``copy_initial_weights`` starts each task's head from a detached copy.

    Raises:
        ConfigError: ``head`` names no module of ``model`` (the message lists them), or one
            without trainable parameters; at the first forward, a head that does not compute
            the model's output.
    """

    schema: ClassVar[type[ANILConfig]] = ANILConfig
    config: ANILConfig

    def __init__(
        self, model: nn.Module, config: ANILConfig | None = None, *, task_type: str, **keys: Any
    ) -> None:
        super().__init__(model, config, task_type=task_type, **keys)
        config = self.config
        self.head = find_head(model, config.head, key="algo.head", role="adapts")
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
        # Rates stored under the weights' full names, looked up by their names in the head.
        self._rate_names = {n: f"{self.head}.{n}" for n in self._head_names}
        head_params = dict(module.named_parameters())
        self.rates = InnerRates(
            config.learn_inner_lr,
            config.inner_lr,
            {full: head_params[n] for n, full in self._rate_names.items()},
            self.inner_steps,
        )
        self.rates.attach(self)
        if self.copy_initial_weights:
            log.warning(
                "algo.copy_initial_weights=true: each task's head starts from a detached copy, "
                "so the head's initial weights (%s) receive no meta-gradient; the body is still "
                "meta-learned",
                self.head,
            )

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
        return self.rates.hyper(self._rate_names)

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

        return self._steps(
            lambda h: self._loss(self._head_forward(h, features), y),
            head,
            steps,
            hyper=self._hyper(),
            first_order=self.first_order,
            track=track,
            func=batched,
        )

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

    # -- protocol ----------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """Meta-gradient of the mean query loss over the batch (body features once per task,
        inner steps on the head only)."""
        params = self._initial_params()
        totals = MetricTotals()

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            loss, out, pre = self._task(params, sx, sy, qx, qy)
            return loss, torch.stack((out, pre))

        def make_batched() -> Callable[[TaskBatch], tuple[Tensor, Tensor]]:
            batched = torch.func.vmap(
                functools.partial(self._task, batched=True), in_dims=(None, 0, 0, 0, 0)
            )

            def run(chunk: TaskBatch) -> tuple[Tensor, Tensor]:
                losses, outs, pres = batched(params, *chunk.tensors())
                return losses, torch.stack((outs, pres), 1)

            return run

        def on_tasks(tasks: TaskBatch, losses: Tensor, outs: Tensor, batched: bool) -> None:
            totals.add("post", task_metrics_per_task(self.task_type, outs[:, 0], tasks.query_y))
            totals.add("pre", task_metrics_per_task(self.task_type, outs[:, 1], tasks.query_y))

        self.run_tasks(batch, one_task, make_batched, on_tasks)
        return with_meta_loss(totals.means(len(batch)))

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
