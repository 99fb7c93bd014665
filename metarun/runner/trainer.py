"""The outer loop: sample a meta-batch, meta-gradient, clip, meta-optimizer step; validate, log and
checkpoint on schedule; stop cleanly on SIGINT / SIGTERM, and stop as diverged on a non-finite
meta-loss or meta-gradient, or a meta-loss beyond ``divergence_factor`` times the loss before
training, without ever checkpointing non-finite values or the update of an exploded step."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import metarun
from metarun.config.checks import warn_schedule_overruns
from metarun.data.prefetch import Prefetcher
from metarun.runner.build import Experiment, LRSchedule
from metarun.runner.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from metarun.runner.distributed import (
    SINGLE,
    DistContext,
    any_rank,
    average_gradients,
    average_metrics,
    rank_slice,
)
from metarun.runner.evaluate import Stat, evaluate_fixed, split_scalars
from metarun.runner.logging import RunLogger

logger = logging.getLogger(__name__)

# A step's metric: a float, or a 0-d tensor left on the device until a logged step reads it.
Scalar = float | torch.Tensor
# Training tasks (at least) whose loss before training divergence_factor multiplies.
REFERENCE_TASKS = 16


#: What picks ``best.pt``, by the dataset's task type: ``(metric, higher is better)``; a task
#: type not listed here selects by ``val/loss``, lower being better.
BEST_METRIC: dict[str, tuple[str, bool]] = {
    "classification": ("val/accuracy", True),
    "reinforcement": ("val/return", True),
}


@dataclass
class Best:
    """The best validation result so far: ``val/accuracy`` (higher is better) for classification,
    ``val/return`` (higher) for reinforcement learning, ``val/loss`` (lower) otherwise."""

    metric: str
    value: float
    step: int


@dataclass
class FitResult:
    step: int  # completed outer steps
    stopped_by: str | None  # "SIGINT" / "SIGTERM" when a signal ended training early
    best: Best | None


class TrainingDiverged(RuntimeError):
    """The meta-loss or meta-gradient became non-finite (more than ``max_nonfinite_steps``
    times), the meta-loss exceeded ``divergence_factor`` times the loss before training, or the
    state to checkpoint holds non-finite values. The message names the step and the keys to
    change; no checkpoint with non-finite values, nor the update of the step that exceeded the
    bound, was written."""


class StopFlag:
    """SIGINT / SIGTERM set a flag instead of killing the process mid-step; the loop checks it
    after each step, saves a checkpoint and returns. A second SIGINT aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        # Python delivers signals to the main thread only; elsewhere (e.g. a notebook worker)
        # keep the default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = name
        logger.warning("%s received: stopping after this step and saving a checkpoint", name)


def hypergrad_norms(model: nn.Module) -> dict[str, float]:
    """Norms of the meta-gradient on the model's initial weights: ``hypergrad/norm`` (global)
    and ``hypergrad/<parameter name>``. Parameters without a gradient count as 0, so
    ``algo.copy_initial_weights=true`` shows up as a norm of 0."""
    norms: dict[str, float] = {}
    squares: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        if param.grad is None:
            norms[f"hypergrad/{name}"] = 0.0
            continue
        norm = torch.linalg.vector_norm(param.grad.detach().float())
        squares.append(norm.square())
        norms[f"hypergrad/{name}"] = float(norm)
    total = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return {"hypergrad/norm": total, **norms}


def total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as ``torch.nn.utils.get_total_norm`` computes it
    (the same two kernels, the same value), without its per-call grouping by device and dtype
    when there is one group: the common case, and the only per-step cost of the divergence
    check on a run without ``grad_clip``."""
    if not grads:
        return torch.tensor(0.0)
    first = grads[0]
    if any(g.device != first.device or g.dtype != first.dtype or g.is_sparse for g in grads):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads), 2.0)), 2.0)


class _Mean:
    """Means of the steps' metrics over one logging interval.

    Values may be 0-d tensors on the device (what the algorithms return): a step only appends
    its dict, and :meth:`pop` reads all of the interval's tensors in one transfer, so steps that
    do not log never wait for the device.
    """

    def __init__(self) -> None:
        self.steps: list[Mapping[str, Scalar]] = []

    def add(self, values: Mapping[str, Scalar]) -> None:
        if values:
            self.steps.append(values)

    def pop(self) -> dict[str, float]:
        tensors = [v for step in self.steps for v in step.values() if isinstance(v, torch.Tensor)]
        read = iter(host_floats(tensors))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for step in self.steps:
            for key, value in step.items():
                number = next(read) if isinstance(value, torch.Tensor) else float(value)
                sums[key] = sums.get(key, 0.0) + number
                counts[key] = counts.get(key, 0) + 1
        self.steps.clear()
        return {key: sums[key] / counts[key] for key in sums}


def host_floats(values: Sequence[torch.Tensor]) -> list[float]:
    """0-d tensors as Python floats, in one device-to-host transfer."""
    if not values:
        return []
    device = values[0].device
    return torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in values]).tolist()


class Trainer:
    """Runs ``experiment.config.outer_steps`` outer steps (continuing from :attr:`step`).

    The trainer owns the task generator, so that a checkpoint captures exactly which tasks come
    next: resuming from step ``k`` gives the same parameters as an uninterrupted run.

    Args:
        experiment: the built run (``tasks`` must be set).
        meta_optimizer: the outer-loop optimizer over ``algorithm.meta_parameters()``.
        run_logger: where scalars go.
        run_dir: checkpoints go to ``<run_dir>/checkpoints/{last,best}.pt``.
        config_yaml: resolved config saved in each checkpoint.
        options: chosen option of each config group, saved in each checkpoint.
        lr_schedule: sets the meta-optimizer's rate before every outer step, from the step alone
            (nothing to checkpoint: a resumed run follows the config's schedule).
    """

    def __init__(
        self,
        experiment: Experiment,
        meta_optimizer: torch.optim.Optimizer,
        run_logger: RunLogger,
        run_dir: str | Path,
        *,
        config_yaml: str,
        options: dict[str, str],
        dist_ctx: DistContext = SINGLE,
        lr_schedule: LRSchedule | None = None,
    ) -> None:
        if experiment.tasks is None:
            raise ValueError("the trainer needs an experiment built with data")
        self.experiment = experiment
        self.tasks = experiment.tasks
        self.config = experiment.config
        self.algorithm = experiment.algorithm
        self.meta_optimizer = meta_optimizer
        self.lr_schedule = lr_schedule
        self.run_logger = run_logger
        self.checkpoint_dir = Path(run_dir) / CHECKPOINT_DIR
        self.config_yaml = config_yaml
        self.options = options
        self.dist = dist_ctx
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.step = 0
        self.best: Best | None = None
        self._prefetcher: Prefetcher | None = None
        self._saved_at = -1
        # The step of the newest last.pt on disk (written or resumed from), for the divergence
        # message; None: no last.pt yet.
        self._last_saved: int | None = None
        # After resuming from the previous checkpoint because last.pt was unreadable, the next
        # save must not keep the unreadable file as the previous one (replacing the good one).
        self.rotate_last = True
        self.nonfinite_steps = 0  # skipped so far (max_nonfinite_steps), checkpointed
        # The loss before training that divergence_factor multiplies (measured at the start of
        # fit, checkpointed so that a resumed run keeps its bound); None: not measured yet.
        self.loss_reference: float | None = None
        self._best_metric, self._higher_is_better = BEST_METRIC.get(
            experiment.task_type, ("val/loss", False)
        )

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of the current state (layout: :mod:`metarun.runner.checkpoint`)."""
        return {
            "algorithm": self.algorithm.state_dict(),
            "meta_opt": self.meta_optimizer.state_dict(),
            "step": self.step,
            "rng": rng_state(self._tasks_state()),
            "config": self.config_yaml,
            "options": dict(self.options),
            "task_type": self.experiment.task_type,
            "best": asdict(self.best) if self.best is not None else None,
            "algorithm_extra": self.algorithm.extra_state(),
            "nonfinite_steps": self.nonfinite_steps,
            "loss_reference": self.loss_reference,
            "metarun_version": metarun.__version__,
        }

    def _tasks_state(self) -> torch.Tensor:
        # While prefetching, the generator runs ahead of what training consumed.
        if self._prefetcher is not None:
            return self._prefetcher.resume_state
        return self.generator.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict`."""
        self.algorithm.load_state_dict(state["algorithm"])
        self.meta_optimizer.load_state_dict(state["meta_opt"])
        self.step = int(state["step"])
        self.best = Best(**state["best"]) if state.get("best") else None
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))  # older checkpoints: none
        # Older checkpoints: None, and fit measures it on the resumed weights.
        reference = state.get("loss_reference")
        self.loss_reference = None if reference is None else float(reference)
        restore_rng_state(state["rng"], self.generator)
        self._last_saved = self.step

    def save(self, name: str = LAST) -> Path:
        """Write ``name`` (``last.pt`` keeps the one it replaces in ``checkpoints.prev/``).

        Raises:
            TrainingDiverged: the state holds non-finite values; nothing is written, so the
                checkpoint already on disk stays the last good one.
        """
        path = self.checkpoint_dir / name
        # Checked on every rank: parameters and optimizer state are the same everywhere after
        # the all-reduce, and every rank must stop together.
        state = self.state_dict()
        bad = nonfinite_entries({"algorithm": state["algorithm"], "meta_opt": state["meta_opt"]})
        if bad:
            raise TrainingDiverged(
                f"training diverged: after outer step {self.step} the state to checkpoint holds "
                f"non-finite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                f"{path.name} was not written. {self._fixes()}"
            )
        if name == LAST:
            self._last_saved = self.step
        if not self.dist.is_main:  # one writer: rank 0
            return path
        keep_previous = name == LAST and self.rotate_last
        path = save_checkpoint(path, state, keep_previous=keep_previous)
        if name == LAST:
            self.rotate_last = True
        logger.debug("saved %s at step %d", path, self.step)
        return path

    # ------------------------------------------------------------------------------- evaluation

    def validate(self) -> dict[str, Stat]:
        """Metrics on the fixed validation tasks (``eval.val_tasks`` of them, ``eval.val_seed``)."""
        cfg = self.config.eval
        return evaluate_fixed(
            self.algorithm,
            self.tasks.val,
            num_tasks=cfg.val_tasks,
            batch_size=cfg.batch_size,
            seed=cfg.val_seed,
            device=self.experiment.device,
            inner_steps=cfg.inner_steps,
        )

    def _update_best(self, scalars: dict[str, float]) -> bool:
        value = scalars.get(self._best_metric)
        if value is None or math.isnan(value):
            return False
        better = self.best is None or (
            value > self.best.value if self._higher_is_better else value < self.best.value
        )
        if better:
            self.best = Best(self._best_metric, value, self.step)
        return better

    # ------------------------------------------------------------------------------------ loop

    def train_step(self, *, logged: bool = False) -> dict[str, Scalar]:
        """One outer step. Returns the algorithm's metrics (``train/...``, floats or 0-d
        tensors still on the device); on a ``logged`` step also pre-adaptation metrics, the
        meta-gradient norms before clipping (``hypergrad/...``) and ``train/lr``.

        The one host read on a step that does not log is the divergence check's single flag.
        """
        cfg = self.config
        if self._prefetcher is not None:
            batch = self._prefetcher.next()
        else:
            batch = self.tasks.train.sample(cfg.meta_batch_size, self.generator)
            batch = batch.to(self.experiment.device)
        if self.dist.enabled and not self.algorithm.splits_examples:
            # Every rank drew the same full meta-batch; each keeps its share of the tasks.
            # (Reweighting algorithms take their share of the examples themselves.)
            sl = rank_slice(len(batch), self.dist)
            batch = batch.split(sl.stop - sl.start)[self.dist.rank]
        self.meta_optimizer.zero_grad(set_to_none=True)
        if self.lr_schedule is not None:
            # Before the algorithm runs: L2RW's look-ahead takes this step's rate.
            self.lr_schedule.apply(self.meta_optimizer, self.step)
        # Pre-adaptation query metrics cost a forward per task: only on steps that log them.
        self.algorithm.pre_adaptation_metrics = logged
        self.algorithm.set_step(self.step)
        metrics: dict[str, Scalar] = dict(self.algorithm.meta_train_step(batch))
        if self.dist.enabled:
            # Explicit all-reduce: DDP's hooks never see functional_call's fast weights.
            average_gradients(self.algorithm.meta_parameters(), self.dist)
            metrics = average_metrics(metrics, self.dist, self.experiment.device)
        if logged:
            norms = hypergrad_norms(self.algorithm.model)
            if not cfg.log.hypergrad_layers:
                norms = {"hypergrad/norm": norms["hypergrad/norm"]}
            metrics.update(norms)
        # The optimizer's parameters are the meta-parameters, without a walk over the modules.
        with_grad = [
            p
            for group in self.meta_optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if cfg.grad_clip is not None:
            # The norm before clipping: what the divergence check reads, at no extra cost.
            grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, cfg.grad_clip)
        else:
            # with_grad holds no None; the filter tells the type checker so.
            grad_norm = total_norm([p.grad for p in with_grad if p.grad is not None])
        if not self._finite(metrics, grad_norm):
            self.step += 1  # the batch is consumed: a skipped step keeps the data order
            return {}
        if logged:
            metrics["train/lr"] = float(self.meta_optimizer.param_groups[0]["lr"])
        self.meta_optimizer.step()
        self.step += 1
        return metrics

    def _finite(self, metrics: Mapping[str, Scalar], grad_norm: torch.Tensor) -> bool:
        """Whether this step may update: its meta-loss and meta-gradient are finite and the
        meta-loss is within the divergence bound (:meth:`loss_bound`). A non-finite step counts
        against ``max_nonfinite_steps`` or raises :class:`TrainingDiverged`; a step beyond the
        bound raises at once (it is not a glitch of one batch but weights or step sizes gone
        wrong).

        One host read per step: the gradient norm and the step's loss tensors, stacked on the
        device and read in one transfer. Per-tensor ``isfinite().all()`` flags cost the default
        job 0.2 ms per step; this read costs what the fused float64 sum it replaced did (14 us,
        ``scripts/bench_divergence.py --part cost``) and gives the bound its meta-loss. NaN and
        inf survive the gradient all-reduce and the metrics are averaged over the ranks, so
        every rank sees the same answer; ``any_rank`` makes sure of it anyway.
        """
        losses = {k: v for k, v in metrics.items() if k.startswith("train/") and k.endswith("loss")}
        tensors: list[torch.Tensor] = [grad_norm]
        slot = {id(grad_norm): 0}
        for value in losses.values():
            if isinstance(value, torch.Tensor) and id(value) not in slot:
                slot[id(value)] = len(tensors)
                tensors.append(value)
        # Metrics are 0-d tensors (MetaAlgorithm's contract); float64 holds any of them.
        read = torch.stack([t.double() for t in tensors]).tolist()
        finite = all(map(math.isfinite, read)) and all(
            math.isfinite(v) for v in losses.values() if not isinstance(v, torch.Tensor)
        )
        bound = self.loss_bound()
        exploded = False
        if finite and bound is not None and "train/meta_loss" in losses:
            meta = losses["train/meta_loss"]
            meta_loss = read[slot[id(meta)]] if isinstance(meta, torch.Tensor) else float(meta)
            exploded = meta_loss > bound
        ok = finite and not exploded
        if self.dist.enabled and any_rank(not ok, self.dist, self.experiment.device) and ok:
            finite = False  # another rank's verdict where this one saw nothing
        elif ok:
            return True
        values = {
            k: read[slot[id(v)]] if isinstance(v, torch.Tensor) else float(v)
            for k, v in losses.items()
        }
        step = self.step + 1
        detail = ", ".join(
            [f"{k}={v:.4g}" for k, v in sorted(values.items())]
            + [f"meta-gradient norm={read[0]:.4g}"]
        )
        if exploded:
            raise TrainingDiverged(
                f"training diverged: train/meta_loss={values['train/meta_loss']:.4g} at outer "
                f"step {step} is "
                f"more than divergence_factor={self.config.divergence_factor:g} times the loss "
                f"before training ({self.loss_reference:.4g}) ({detail}; "
                f"divergence_factor=null turns this bound off). {self._fixes()} {self._kept()}"
            )
        self.nonfinite_steps += 1
        limit = self.config.max_nonfinite_steps
        if self.nonfinite_steps <= limit:
            logger.warning(
                "outer step %d: non-finite meta-loss or meta-gradient (%s): step skipped, no "
                "meta-optimizer update (%d of max_nonfinite_steps=%d)",
                step,
                detail,
                self.nonfinite_steps,
                limit,
            )
            return False
        if limit:
            allowed = f"{self.nonfinite_steps} such steps, more than max_nonfinite_steps={limit}"
        else:
            allowed = "max_nonfinite_steps=N would skip up to N such steps"
        raise TrainingDiverged(
            f"training diverged: non-finite meta-loss or meta-gradient at outer step {step} "
            f"({detail}; {allowed}). {self._fixes()} {self._kept()}"
        )

    def loss_bound(self) -> float | None:
        """The meta-loss above which training stops as diverged: ``divergence_factor`` times
        the loss before training; None while unmeasured or with ``divergence_factor=null``."""
        factor = self.config.divergence_factor
        if factor is None or self.loss_reference is None:
            return None
        return factor * self.loss_reference

    def measure_loss_reference(self) -> float | None:
        """The loss of the current weights before any adaptation (``evaluate`` with 0 inner
        steps: the query loss of the initial weights, a reweighting algorithm's clean loss),
        averaged over at least ``REFERENCE_TASKS`` training tasks, drawn a meta-batch at a time
        from a generator of their own, so that the run's tasks and random streams are those of a
        run without it. None if it is not a positive finite number (no bound then).

        The meta-loss of a run whose inner loop explodes is huge from its first step, so no
        bound relative to the meta-loss's own first values could see it; the loss before
        adaptation can, and a healthy meta-loss (MAML++'s weighted one, L2RW's weighted one,
        a regression loss however large it starts) stays within a few times it. Several tasks,
        not one meta-batch: a meta-batch of one sinusoid can have a loss 1/1000 of another's.
        """
        cfg = self.config
        device = self.experiment.device
        # seed + 1 draws the start-up hook's batches (runner.api); this is another stream.
        generator = torch.Generator().manual_seed(cfg.seed + 2)
        cuda = [device.index or 0] if device.type == "cuda" else []
        losses: list[torch.Tensor] = []
        with torch.random.fork_rng(devices=cuda):
            for _ in range(-(-REFERENCE_TASKS // cfg.meta_batch_size)):
                batch = self.tasks.train.sample(cfg.meta_batch_size, generator).to(device)
                metrics = self.algorithm.evaluate(batch, 0)
                values = metrics.get("pre/loss", metrics.get("post/loss"))
                if values is None:
                    return None
                losses.append(values.detach().double().flatten().cpu())
        reference = float(torch.cat(losses).mean())
        return reference if math.isfinite(reference) and reference > 0 else None

    def _fixes(self) -> str:
        """What to change, naming the keys and their current values."""
        cfg = self.config
        keys = [f"meta_optimizer.lr (now {cfg.meta_optimizer.lr:g})"]
        keys += [f"{key} (now {value:g})" for key, value in cfg.algo.step_sizes().items()]
        clip = (
            "set grad_clip (e.g. grad_clip=10)"
            if cfg.grad_clip is None
            else f"lower grad_clip (now {cfg.grad_clip:g})"
        )
        return f"Lower {' or '.join(keys)}, or {clip}."

    def _kept(self) -> str:
        """Which checkpoint the divergence left on disk."""
        if self._last_saved is None:
            return "No checkpoint was written (none had been saved before it; see save.every)."
        return (
            f"No checkpoint was written; the last good one is "
            f"{self.checkpoint_dir / LAST} (step {self._last_saved})."
        )

    def fit(self) -> FitResult:
        """Train until ``outer_steps`` or a stop signal; always leaves ``last.pt`` behind.

        Every training run starts here: it warns first about schedule keys beyond
        ``outer_steps`` (:mod:`metarun.config.checks`)."""
        cfg = self.config
        if self.dist.is_main:  # one process says it
            warn_schedule_overruns(cfg)
        self.algorithm.train()
        if cfg.divergence_factor is not None and self.loss_reference is None:
            self.loss_reference = self.measure_loss_reference()
            bound = self.loss_bound()
            if bound is None:
                logger.warning(
                    "divergence_factor=%g: no bound (the loss before training is not a positive "
                    "number); only non-finite values stop the run",
                    cfg.divergence_factor,
                )
            else:
                logger.info(
                    "training stops as diverged if train/meta_loss exceeds %.4g "
                    "(divergence_factor=%g x %.4g, the loss at step %d before adaptation)",
                    bound,
                    cfg.divergence_factor,
                    self.loss_reference,
                    self.step,
                )
        self._prefetcher = Prefetcher(
            self.tasks.train.sample,
            cfg.meta_batch_size,
            self.generator,
            depth=prefetch_depth(cfg.prefetch, self.experiment.device),
            device=self.experiment.device,
        )
        try:
            stop = self._loop()
        finally:
            prefetcher, self._prefetcher = self._prefetcher, None
            prefetcher.close()
            # Rewind to the first batch not consumed: what a resumed run would draw next.
            self.generator.set_state(prefetcher.resume_state)
        if self._saved_at != self.step:
            self.save(LAST)
        self.run_logger.flush()
        return FitResult(step=self.step, stopped_by=stop.signal, best=self.best)

    def _loop(self) -> StopFlag:
        """Steps until done or signalled; returns the flag saying which."""
        cfg = self.config
        interval = _Mean()
        step_time = 0.0
        steps_timed = 0
        with (
            StopFlag() as stop,
            logging_redirect_tqdm(),
            tqdm(
                total=cfg.outer_steps,
                initial=self.step,
                desc="meta-train",
                unit="step",
                dynamic_ncols=True,
                # None: shown only on a terminal; one bar per run, not per rank.
                disable=None if cfg.log.progress and self.dist.is_main else True,
            ) as bar,
        ):
            while self.step < cfg.outer_steps and not self._stopping(stop):
                start = time.perf_counter()
                next_step = self.step + 1
                log_due = next_step % cfg.log.every == 0 or next_step == cfg.outer_steps
                metrics = self.train_step(logged=log_due)  # {} on a skipped non-finite step
                step_time += time.perf_counter() - start
                steps_timed += 1
                interval.add(metrics)
                bar.update(1)

                scalars: dict[str, float] = {}
                if log_due:
                    scalars.update(interval.pop())  # means over the interval; hypergrad: now
                    # From the interval's means: formatting a step's own metrics would read
                    # them from the device on every step.
                    bar.set_postfix(_postfix(scalars), refresh=False)
                    scalars.update(self.algorithm.log_scalars())
                    scalars["time/sec_per_step"] = step_time / max(steps_timed, 1)
                    if self.nonfinite_steps:
                        scalars["train/nonfinite_steps"] = float(self.nonfinite_steps)
                    # E.g. L2RW's example weights.
                    self.run_logger.log_histograms(self.step, self.algorithm.log_histograms())
                    self.run_logger.log_curves(self.step, self.algorithm.log_curves())
                    step_time, steps_timed = 0.0, 0
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    val = split_scalars("val", self.validate())
                    scalars.update(val)
                    improved = self._update_best(val)
                    logger.info("step %d: %s", self.step, _format(val))
                    if improved and cfg.save.keep_best:
                        self.save(BEST)
                self.run_logger.log(self.step, scalars)
                if cfg.save.every and self.step % cfg.save.every == 0:
                    self.save(LAST)
                    self._saved_at = self.step
        return stop

    def _stopping(self, stop: StopFlag) -> bool:
        # A signal on any rank stops every rank after the same step.
        if not self.dist.enabled:
            return stop.signal is not None
        if any_rank(stop.signal is not None, self.dist, self.experiment.device):
            stop.signal = stop.signal or "SIGTERM"
            return True
        return False


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Keys (dotted) of the floating-point tensors in a nested state dict that hold NaN or inf.

    One fused reduction and one host read for the whole state; the keys are only looked up when
    something is wrong.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                tensors[key] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}" if key else str(i))

    walk(state, prefix)
    by_device: dict[torch.device, list[str]] = {}
    for key, tensor in tensors.items():
        by_device.setdefault(tensor.device, []).append(key)
    bad: list[str] = []
    for keys in by_device.values():  # one host read per device (Adam keeps its step on the CPU)
        flags = torch.stack([torch.isfinite(tensors[k]).all() for k in keys]).tolist()
        bad += [key for key, ok in zip(keys, flags) if not ok]
    return bad


def prefetch_depth(prefetch: int | None, device: torch.device) -> int:
    """``prefetch`` as configured, or for null: 2 on CUDA, 0 on the CPU (there the producer
    thread competes with the step's own threads for the cores)."""
    if prefetch is not None:
        return prefetch
    return 2 if device.type == "cuda" else 0


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    """Progress-bar postfix: the last logging interval's query loss and accuracy
    (post-adaptation)."""
    # The outer objective; example reweighting (l2rw/erm) reports its training loss.
    loss_key = "train/meta_loss" if "train/meta_loss" in metrics else "train/loss"
    shown = {"loss": loss_key, "acc": "train/accuracy"}
    return {short: f"{metrics[key]:.3g}" for short, key in shown.items() if key in metrics}


def _format(scalars: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in sorted(scalars.items()))
