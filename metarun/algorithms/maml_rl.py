"""MAML for reinforcement learning (Finn et al. 2017, Sec. 5.3): a Gaussian MLP policy adapted to
each task by policy-gradient steps (the REINFORCE / VPG surrogate with a linear-feature
baseline) on episodes it samples, meta-trained by TRPO on the episodes of the adapted policies,
or by a PPO-style clipped objective (``outer=ppo``).

The meta-gradient differentiates through the inner updates (second order, or first order with
``first_order=true``) with :func:`metarun.unroll.func_inner_loop`, vectorised over tasks with
``torch.func.vmap``; as in the paper, the dependence of the pre-adaptation episodes' sampling
distribution on the initial parameters is not differentiated. The outer step is computed here
(:mod:`metarun.rl.outer`) and handed to the runner as ``.grad = -step``: the run's meta-optimizer
is plain SGD with learning rate 1 (the environment datasets set it), which applies it as
computed. ``hypergrad/norm`` is therefore the norm of the step taken.

The policy starts as the authors' (``policy_init=glorot``: Glorot-uniform weights, zero biases);
inner steps after the first take ``inner_lr_later`` (the paper halved them at evaluation).

``inner_steps=0`` trains one policy on all tasks without adaptation (TRPO on the task
distribution): evaluated with ``eval_inner_steps >= 1`` it is the paper's "pretrained" baseline.

References:
    Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    ICML 2017 (Sec. 5.3, App. A.2). The authors' rllab code: github.com/cbfinn/maml_rl.
    Schulman et al., "Trust Region Policy Optimization", ICML 2015.

Example::

    metarun experiment=navigation2d_maml
    metarun algo=maml_rl dataset=navigation2d algo.outer=ppo algo.first_order=true
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm
from metarun.registry import BuildContext, register
from metarun.rl.env import RL, RLDatasetSchema, VectorEnv
from metarun.rl.episodes import Batch, Episodes, PolicyFn, process, sample_episodes
from metarun.rl.outer import OuterStep, ppo_step, trpo_step
from metarun.rl.policy import gaussian_kl, gaussian_log_prob
from metarun.spec.bases import AlgoSchema
from metarun.spec.checks import require
from metarun.spec.enums import OptimizerName, ScheduleName
from metarun.spec.errors import ConfigError
from metarun.tasks import TaskBatch
from metarun.unroll import SGD, functional_call, get_params
from metarun.unroll.batched import func_inner_loop

log = logging.getLogger(__name__)

Params = dict[str, Tensor]


class OuterName(str, Enum):
    """MAML-RL's outer step."""

    trpo = "trpo"  # Finn et al. 2017: TRPO on the post-adaptation episodes
    ppo = "ppo"  # a clipped surrogate, a few Adam epochs: cheaper (no Fisher products)


class PolicyInit(str, Enum):
    """How the policy's mean network starts."""

    # cbfinn/maml_rl (maml_minimal_gauss_mlp_policy.py, create_MLP): Glorot-uniform weights, zero
    # biases, so the mean is 0 at the start position and scales with the distance from it.
    glorot = "glorot"
    # The model's own initialisation (torch.nn.Linear: uniform weights and biases of scale
    # 1/sqrt(fan_in), which for 2 inputs gives biases up to 0.7: a random drift at the start).
    model = "model"


@dataclass
class MAMLRLConfig(AlgoSchema):
    """``algo=maml_rl``: MAML with a policy-gradient inner loop and a TRPO (or PPO) outer step."""

    task_kinds: ClassVar[tuple[str, ...]] = (RL,)
    task_types: ClassVar[tuple[str, ...]] = ("reinforcement",)
    adaptation_keys: ClassVar[tuple[str, ...]] = (
        "inner_lr", "inner_steps", "eval_inner_steps", "fast_batch_size",
    )  # fmt: skip
    chosen_defaults: ClassVar[dict[str, str]] = {
        "fast_batch_size": "Finn et al. 2017, Sec. 5.3 (20 trajectories per gradient step)",
    }

    # The inner loop chosen for the environment: its dataset file's `adapt` block.
    inner_lr: float = "${adapt.inner_lr}"  # type: ignore[assignment]  # interpolation
    inner_steps: int = "${adapt.inner_steps}"  # type: ignore[assignment]
    # Step size of every inner step after the first (null: inner_lr). Finn et al. 2017, App. A.2,
    # halved it after the first step at evaluation (their test script: 0.5, then 0.25): a policy
    # meta-trained for one step of inner_lr overshoots with further full-size steps.
    inner_lr_later: float | None = None
    eval_inner_steps: int = "${adapt.eval_inner_steps}"  # type: ignore[assignment]
    first_order: bool = False
    # Episodes per task for each adaptation step and for the meta-objective (rllab: batch_size).
    fast_batch_size: int = 20
    discount: float = 0.99
    gae_lambda: float = 1.0
    # Initial log standard deviation of the Gaussian policy (rllab's init_std=1).
    init_log_std: float = 0.0
    policy_init: PolicyInit = PolicyInit.glorot
    outer: OuterName = OuterName.trpo
    # TRPO: KL bound (rllab's step_size), conjugate-gradient iterations and damping, line search.
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_backtrack_ratio: float = 0.8
    ls_max_backtracks: int = 15
    # outer=ppo: Adam epochs per outer step, their learning rate, the ratio clip.
    ppo_epochs: int = 5
    ppo_lr: float = 0.001
    ppo_clip: float = 0.2

    def __post_init__(self) -> None:
        require(
            isinstance(self.inner_lr, str) or self.inner_lr > 0,
            "algo.inner_lr", self.inner_lr, "> 0", "algo.inner_lr=0.1",
        )  # fmt: skip
        require(
            self.inner_lr_later is None or self.inner_lr_later > 0,
            "algo.inner_lr_later", self.inner_lr_later, "> 0 or null (null: algo.inner_lr)",
            "algo.inner_lr_later=0.05",
        )  # fmt: skip
        require(
            isinstance(self.inner_steps, str) or self.inner_steps >= 0,
            "algo.inner_steps", self.inner_steps, ">= 0 (0: the pretrained baseline)",
            "algo.inner_steps=1",
        )  # fmt: skip
        require(
            isinstance(self.eval_inner_steps, str) or self.eval_inner_steps >= 0,
            "algo.eval_inner_steps", self.eval_inner_steps, ">= 0", "algo.eval_inner_steps=1",
        )  # fmt: skip
        require(
            self.fast_batch_size >= 1, "algo.fast_batch_size", self.fast_batch_size, ">= 1",
            "algo.fast_batch_size=20",
        )  # fmt: skip
        require(
            0 < self.discount <= 1, "algo.discount", self.discount, "in (0, 1]",
            "algo.discount=0.99",
        )  # fmt: skip
        require(
            0 <= self.gae_lambda <= 1, "algo.gae_lambda", self.gae_lambda, "in [0, 1]",
            "algo.gae_lambda=1.0",
        )  # fmt: skip
        require(self.max_kl > 0, "algo.max_kl", self.max_kl, "> 0", "algo.max_kl=0.01")
        require(self.cg_iters >= 1, "algo.cg_iters", self.cg_iters, ">= 1", "algo.cg_iters=10")
        require(
            self.cg_damping >= 0, "algo.cg_damping", self.cg_damping, ">= 0",
            "algo.cg_damping=1e-5",
        )  # fmt: skip
        require(
            0 < self.ls_backtrack_ratio < 1, "algo.ls_backtrack_ratio", self.ls_backtrack_ratio,
            "in (0, 1)", "algo.ls_backtrack_ratio=0.8",
        )  # fmt: skip
        require(
            self.ls_max_backtracks >= 1, "algo.ls_max_backtracks", self.ls_max_backtracks,
            ">= 1", "algo.ls_max_backtracks=15",
        )  # fmt: skip
        require(
            self.ppo_epochs >= 1, "algo.ppo_epochs", self.ppo_epochs, ">= 1",
            "algo.ppo_epochs=5",
        )  # fmt: skip
        require(self.ppo_lr > 0, "algo.ppo_lr", self.ppo_lr, "> 0", "algo.ppo_lr=0.001")
        require(
            0 < self.ppo_clip < 1, "algo.ppo_clip", self.ppo_clip, "in (0, 1)",
            "algo.ppo_clip=0.2",
        )  # fmt: skip

    def step_sizes(self) -> dict[str, float]:
        sizes = {"algo.inner_lr": self.inner_lr}
        if self.outer is OuterName.trpo:
            sizes["algo.max_kl"] = self.max_kl
        else:
            sizes["algo.ppo_lr"] = self.ppo_lr
        return sizes

    def check_run(self, run: Any) -> None:
        # The outer step is computed by the algorithm; the meta-optimizer must apply it as is.
        opt = run.meta_optimizer
        as_is = (
            opt.name is OptimizerName.sgd
            and opt.lr == 1.0
            and opt.momentum == 0.0
            and opt.weight_decay == 0.0
            and opt.schedule is ScheduleName.constant
        )
        if not as_is:
            raise ConfigError(
                f"algo=maml_rl computes its outer step ({self.outer.value}) itself and needs a "
                "meta-optimizer that applies it unchanged: meta_optimizer.name=sgd "
                "meta_optimizer.lr=1.0 (momentum 0, weight_decay 0, schedule constant), got "
                f"meta_optimizer.name={opt.name.value} meta_optimizer.lr={opt.lr:g} "
                f"momentum={opt.momentum:g} weight_decay={opt.weight_decay:g} "
                f"schedule={opt.schedule.value} (the dataset file sets it; to change the step "
                "size set algo.max_kl or algo.ppo_lr)"
            )
        if run.grad_clip is not None:
            raise ConfigError(
                f"grad_clip must be null for algo=maml_rl, got {run.grad_clip!r} (clipping "
                "would change the TRPO/PPO step; set grad_clip=null, and algo.max_kl to bound "
                "the step)"
            )


def _glorot_zero_bias(model: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every linear layer of ``model``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()


@register("algo", "maml_rl", MAMLRLConfig)
class MAMLRL(MetaAlgorithm):
    """MAML-RL (see the module docstring).

    Args:
        model: the policy's mean network (``obs (..., O) -> (..., A)``).
        config: the algorithm's settings.
        dataset: the environment dataset's config (builds the environment on first use).
    """

    def __init__(self, model: nn.Module, config: MAMLRLConfig, dataset: RLDatasetSchema) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.dataset = dataset
        self.inner_steps = int(config.inner_steps)
        self.eval_inner_steps = int(config.eval_inner_steps)
        self.first_order = bool(config.first_order)
        self.log_std = nn.Parameter(torch.full((dataset.action_dim,), float(config.init_log_std)))
        if config.policy_init is PolicyInit.glorot:
            _glorot_zero_bias(model)
        self._names = [n for n, _ in model.named_parameters()] + ["log_std"]
        self._inner_opt = SGD(lr=float(config.inner_lr))
        self._later_opt = SGD(lr=float(config.inner_lr))
        self.set_inner_lr_later(config.inner_lr_later)
        self._env: VectorEnv | None = None
        self._env_device: torch.device | None = None

    @classmethod
    def from_config(cls, config: MAMLRLConfig, model: nn.Module, context: BuildContext) -> MAMLRL:
        if not isinstance(context.dataset, RLDatasetSchema):
            raise ConfigError(
                f"algo=maml_rl needs an environment dataset, got {type(context.dataset).__name__}"
                " (use dataset=navigation2d, halfcheetah_vel or halfcheetah_dir)"
            )
        return cls(model, config, context.dataset)

    def set_inner_lr_later(self, lr: float | None) -> None:
        """The step size of the inner steps after the first (``None``: ``inner_lr``), e.g. to
        evaluate one trained policy under several adaptation schedules."""
        self.config.inner_lr_later = lr
        self._later_opt = SGD(lr=float(self.config.inner_lr if lr is None else lr))

    # -- the policy as a function of its parameters -------------------------------------------
    def params(self) -> Params:
        """The meta-parameters, keyed by name: the mean network's and ``log_std``."""
        return {**get_params(self.model), "log_std": self.log_std}

    def _dist(self, theta: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        net = {k: v for k, v in theta.items() if k != "log_std"}
        return functional_call(self.model, net, obs.to(theta["log_std"].dtype)), theta["log_std"]

    def _log_prob(self, theta: Params, obs: Tensor, actions: Tensor) -> Tensor:
        mean, log_std = self._dist(theta, obs)
        return gaussian_log_prob(mean, log_std, actions)

    def inner_loss(self, theta: Params, batch: Batch) -> Tensor:
        """One task's VPG / REINFORCE surrogate ``-mean(log pi(a|s) * advantage)`` over its
        valid steps (rllab's VPG); its gradient is the policy gradient."""
        logp = self._log_prob(theta, batch.observations, batch.actions)
        return -(logp * batch.advantages * batch.mask).sum() / batch.mask.sum()

    def adapt_task(self, theta: Params, inner: tuple[Batch, ...]) -> Params:
        """One task's parameters after one policy-gradient step on each of ``inner`` (the first
        of ``inner_lr``, the others of ``inner_lr_later``; differentiable in ``theta``;
        ``torch.func``, so it runs under ``vmap``)."""
        for index, batch in enumerate(inner):

            def loss(p: Params, batch: Batch = batch) -> Tensor:
                return self.inner_loss(p, batch)

            opt = self._inner_opt if index == 0 else self._later_opt
            theta = func_inner_loop(
                loss, theta, opt, 1, first_order=self.first_order,
                trainable=self._names,
            )  # fmt: skip
        return theta

    def _ratio(
        self, theta: Params, inner: tuple[Batch, ...], post: Batch, old_logp: Tensor
    ) -> Tensor:
        adapted = self.adapt_task(theta, inner)
        return (self._log_prob(adapted, post.observations, post.actions) - old_logp).exp()

    def task_surrogate(
        self, theta: Params, inner: tuple[Batch, ...], post: Batch, old_logp: Tensor
    ) -> Tensor:
        """One task's meta-objective: TRPO's importance-weighted surrogate of the adapted policy
        on the post-adaptation episodes, ``-mean(ratio * advantage)``."""
        ratio = self._ratio(theta, inner, post, old_logp)
        return -(ratio * post.advantages * post.mask).sum() / post.mask.sum()

    def task_clipped(
        self, theta: Params, inner: tuple[Batch, ...], post: Batch, old_logp: Tensor
    ) -> Tensor:
        """One task's PPO objective: the clipped surrogate."""
        ratio = self._ratio(theta, inner, post, old_logp)
        eps = self.config.ppo_clip
        gain = torch.minimum(
            ratio * post.advantages, ratio.clamp(1 - eps, 1 + eps) * post.advantages
        )
        return -(gain * post.mask).sum() / post.mask.sum()

    def task_kl(
        self,
        theta: Params,
        inner: tuple[Batch, ...],
        post: Batch,
        old_mean: Tensor,
        old_log_std: Tensor,
    ) -> Tensor:
        """One task's mean KL from the adapted policy that sampled ``post`` to the one ``theta``
        adapts to."""
        mean, log_std = self._dist(self.adapt_task(theta, inner), post.observations)
        kl = gaussian_kl(old_mean, old_log_std, mean, log_std)
        return (kl * post.mask).sum() / post.mask.sum()

    def surrogate(
        self, theta: Params, inner: tuple[Batch, ...], post: Batch, old_logp: Tensor
    ) -> Tensor:
        """The meta-objective: :meth:`task_surrogate` averaged over the tasks (leading
        dimension of ``inner`` and ``post``), all tasks at once."""
        per_task = torch.func.vmap(self.task_surrogate, in_dims=(None, 0, 0, 0))
        return per_task(theta, inner, post, old_logp).mean()

    # -- sampling -------------------------------------------------------------------------------
    def before_training(self, sample: Callable[[], TaskBatch], device: torch.device) -> None:
        """Build the environment now: a simulator that is not installed stops the run at
        start-up with its install command, not at the first episode."""
        self.environment(device)

    def environment(self, device: torch.device) -> VectorEnv:
        if self._env is None or self._env_device != device:
            self._env = self.dataset.environment(device)
            self._env_device = device
        return self._env

    def _policy(self, per_task: Params) -> PolicyFn:
        """The sampling policy of ``T`` tasks' parameters (leading task dimension)."""
        means = torch.func.vmap(lambda p, o: self._dist(p, o)[0])

        def policy(obs: Tensor) -> tuple[Tensor, Tensor]:
            return means(per_task, obs), per_task["log_std"].unsqueeze(1)

        return policy

    @torch.no_grad()
    def _adapt_all(self, point: Params, inner: list[Batch], tasks: int) -> Params:
        if not inner:
            return {k: v.expand(tasks, *v.shape) for k, v in point.items()}
        adapt = torch.func.vmap(self.adapt_task, in_dims=(None, 0))
        return {k: v.detach() for k, v in adapt(point, tuple(inner)).items()}

    def _episodes(
        self, batch: TaskBatch, steps: int, seed: Tensor
    ) -> tuple[list[Episodes], list[Batch], Params]:
        """Sample episodes before and after each of ``steps`` adaptation steps (no meta-graph):
        ``steps + 1`` sets of episodes, the processed batches of the first ``steps``, and the
        tasks' parameters after the last step."""
        tasks = batch.support_x
        env = self.environment(tasks.device)
        generator = torch.Generator().manual_seed(int(seed[0]))
        point = {k: v.detach() for k, v in self.params().items()}
        inner: list[Batch] = []
        episodes: list[Episodes] = []
        adapted = self._adapt_all(point, inner, len(tasks))
        c = self.config
        for step in range(steps + 1):
            found = sample_episodes(env, self._policy(adapted), tasks, c.fast_batch_size, generator)
            episodes.append(found)
            if step < steps:
                inner.append(process(found, c.discount, c.gae_lambda))
                adapted = self._adapt_all(point, inner, len(tasks))
        return episodes, inner, adapted

    # -- protocol -------------------------------------------------------------------------------
    def meta_train_step(self, batch: TaskBatch) -> dict[str, Any]:
        """Sample, adapt, sample again, and compute the outer step; leaves ``-step`` in
        ``.grad`` of the meta-parameters (the runner's SGD with rate 1 applies it)."""
        c = self.config
        episodes, inner_list, adapted = self._episodes(batch, self.inner_steps, batch.support_y)
        inner = tuple(inner_list)
        post = process(episodes[-1], c.discount, c.gae_lambda)
        with torch.no_grad():
            old_mean, old_log_std = torch.func.vmap(self._dist)(adapted, post.observations)
            old_log_std = old_log_std.unsqueeze(1)
            old_logp = gaussian_log_prob(old_mean, old_log_std, post.actions)

        def kl(theta: Params) -> Tensor:
            per_task = torch.func.vmap(self.task_kl, in_dims=(None, 0, 0, 0, 0))
            return per_task(theta, inner, post, old_mean, old_log_std).mean()

        theta = self.params()
        step: OuterStep
        if c.outer is OuterName.trpo:
            step = trpo_step(
                lambda p: self.surrogate(p, inner, post, old_logp), kl, theta,
                max_kl=c.max_kl, damping=c.cg_damping, cg_iters=c.cg_iters,
                backtrack_ratio=c.ls_backtrack_ratio, max_backtracks=c.ls_max_backtracks,
            )  # fmt: skip
        else:
            clipped = torch.func.vmap(self.task_clipped, in_dims=(None, 0, 0, 0))
            step = ppo_step(
                lambda p: clipped(p, inner, post, old_logp).mean(), kl, theta,
                lr=c.ppo_lr, epochs=c.ppo_epochs,
            )  # fmt: skip
        if step.backtracks < 0:
            log.warning(
                "TRPO line search found no step that lowers the meta-objective within "
                "algo.max_kl=%g; the parameters stay (train/backtracks=-1)",
                c.max_kl,
            )
        for name, param in zip(self._names, self.meta_parameters_by_name()):
            param.grad = -step.step[name].to(param.dtype)
        return {
            "train/pre_return": episodes[0].returns().mean().double(),
            "train/post_return": episodes[-1].returns().mean().double(),
            "train/meta_loss": step.loss_after.double(),
            "train/meta_loss_before": step.loss_before.double(),
            "train/kl": step.kl.double(),
            "train/backtracks": torch.tensor(float(step.backtracks), dtype=torch.float64),
        }

    def meta_parameters_by_name(self) -> list[nn.Parameter]:
        """The parameters in the order of :meth:`params`' keys."""
        return [*self.model.parameters(), self.log_std]

    def eval_steps(self, inner_steps: int | None) -> int:
        return self.eval_inner_steps if inner_steps is None else inner_steps

    def evaluate(self, batch: TaskBatch, inner_steps: int | None = None) -> dict[str, Tensor]:
        """Per-task mean returns of the episodes before adaptation (``pre/return``) and after
        ``inner_steps`` policy-gradient steps (``post/return``), each ``(T,)``."""
        steps = self.eval_steps(inner_steps)
        episodes, _, _ = self._episodes(batch, steps, batch.query_y)
        return {
            "pre/return": episodes[0].returns().float().cpu(),
            "post/return": episodes[-1].returns().float().cpu(),
        }

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None
    ) -> dict[str, Tensor]:
        """The policy's parameters adapted to one task (``support_x``: its ``(task_dim,)``
        parameters, ``support_y``: a 0-d seed of the episodes), without a meta-graph."""
        batch = TaskBatch(
            support_x[None], support_y.reshape(1), support_x[None], support_y.reshape(1)
        )
        _, _, adapted = self._episodes(batch, self.eval_steps(steps), batch.support_y)
        return {k: v[0] for k, v in adapted.items()}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The adapted policy's mean action for observations ``x`` ``(..., O)``."""
        with torch.no_grad():
            return self._dist(params, x)[0]
