"""The run's own schema: :class:`RunConfig` and the groups every run has (meta-optimizer,
evaluation, logging, checkpoints).

The options of ``algo``, ``dataset`` and ``model`` keep their schemas beside their code and
register them in :mod:`metarun.registry`. Hydra merges each YAML onto its schema, so a mistyped
key, a value of the wrong type or an unknown enum member fails at compose time with the full
key. ``__post_init__`` holds the semantic checks; it runs when :func:`metarun.config.validate`
turns the composed config into these dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from metarun.spec.bases import check_fits
from metarun.spec.checks import require
from metarun.spec.enums import Mode, OptimizerName, ScheduleName
from metarun.spec.errors import ConfigError


@dataclass
class MetaOptimizerConfig:
    """The outer-loop optimizer over ``algorithm.meta_parameters()``."""

    # Keys counting outer steps, and what turns each on (metarun.config.checks warns when the
    # run ends before them).
    schedule_keys: ClassVar[dict[str, str | None]] = {"milestones": "step_schedule"}

    name: OptimizerName = OptimizerName.adam
    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: ScheduleName = ScheduleName.constant
    milestones: list[int] = field(default_factory=list)  # schedule=step: outer steps
    gamma: float = 0.1  # schedule=step: factor at each milestone
    min_lr: float = 0.0  # schedule=cosine: the rate reached at outer_steps

    @property
    def step_schedule(self) -> bool:
        """Whether ``milestones`` apply (``schedule=step``)."""
        return self.schedule is ScheduleName.step

    def __post_init__(self) -> None:
        require(self.lr > 0, "meta_optimizer.lr", self.lr, "> 0", "meta_optimizer.lr=0.001")
        milestones = list(self.milestones)
        require(
            all(m >= 1 for m in milestones) and milestones == sorted(set(milestones)),
            "meta_optimizer.milestones",
            milestones,
            "increasing outer steps >= 1",
            "meta_optimizer.milestones=[40000,60000]",
        )
        require(
            self.schedule is not ScheduleName.step or bool(milestones),
            "meta_optimizer.milestones",
            milestones,
            "non-empty for meta_optimizer.schedule=step",
            "meta_optimizer.milestones=[40000,60000]",
        )
        require(
            self.gamma > 0, "meta_optimizer.gamma", self.gamma, "> 0", "meta_optimizer.gamma=0.1"
        )
        require(
            0 <= self.min_lr <= self.lr,
            "meta_optimizer.min_lr",
            self.min_lr,
            f"in [0, meta_optimizer.lr={self.lr}]",
            "meta_optimizer.min_lr=0",
        )
        require(
            self.weight_decay >= 0,
            "meta_optimizer.weight_decay",
            self.weight_decay,
            ">= 0",
            "meta_optimizer.weight_decay=0",
        )
        require(
            self.momentum >= 0,
            "meta_optimizer.momentum",
            self.momentum,
            ">= 0",
            "meta_optimizer.momentum=0.9",
        )


@dataclass
class EvalConfig:
    """Validation during training and the final test."""

    # every > outer_steps: no validation at all (metarun.config.checks warns).
    schedule_keys: ClassVar[dict[str, str | None]] = {"every": None}

    every: int = 500  # validate every N outer steps; 0 = never
    val_tasks: int = 100
    num_tasks: int = 600  # test tasks; 600 as in Finn et al. 2017
    batch_size: int = 25  # tasks per evaluate() call (memory, not results)
    # Adaptation steps at val/test; null = algo.eval_inner_steps.
    inner_steps: int | None = None
    # Test metrics against adaptation steps (test_curve/* against the step count, results.json's
    # "curve", figures/adaptation_curve.png): these step counts; [] = none; null = the
    # algorithm's default: every step 0..N (N = the test's inner steps) where it records them
    # along one adaptation, else 0, 1 and N (Finn et al. 2017, Fig. 2's views); none for
    # algorithms without inner steps.
    curve_steps: list[int] | None = None
    # Fixed seeds: the same val/test tasks for every run, whatever the training seed.
    val_seed: int = 1000
    test_seed: int = 2000
    use_best: bool = False  # test the best-validation weights instead of the last ones
    # Pictures of the final test under <run_dir>/figures/ and TensorBoard test_figure/*: the
    # adaptation curve, and the dataset's own (sinusoid: the fit before and after adaptation).
    figures: bool = True

    def __post_init__(self) -> None:
        require(self.every >= 0, "eval.every", self.every, ">= 0 (0 = never)", "eval.every=500")
        require(self.val_tasks >= 1, "eval.val_tasks", self.val_tasks, ">= 1", "eval.val_tasks=100")
        require(self.num_tasks >= 1, "eval.num_tasks", self.num_tasks, ">= 1", "eval.num_tasks=600")
        require(
            self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1", "eval.batch_size=25"
        )
        require(
            self.inner_steps is None or self.inner_steps >= 0,
            "eval.inner_steps",
            self.inner_steps,
            ">= 0 or null",
            "eval.inner_steps=10",
        )
        require(
            self.curve_steps is None or all(s >= 0 for s in self.curve_steps),
            "eval.curve_steps",
            self.curve_steps if self.curve_steps is None else list(self.curve_steps),
            "a list of step counts >= 0, [] or null",
            "eval.curve_steps=[1,5,10]",
        )


@dataclass
class LogConfig:
    """Scalars to TensorBoard and ``metrics.jsonl``, progress bar to stderr."""

    every: int = 100
    tensorboard: bool = True
    progress: bool = True  # tqdm bar (only shown on a terminal)
    hypergrad_layers: bool = True  # one hypergrad/<name> norm per parameter tensor

    def __post_init__(self) -> None:
        require(self.every >= 1, "log.every", self.every, ">= 1", "log.every=100")


@dataclass
class SaveConfig:
    """Checkpoints under ``<run dir>/checkpoints/``: ``last.pt`` and ``best.pt``."""

    every: int = 1000  # also always at the end; 0 = only at the end
    keep_best: bool = True  # best.pt by val accuracy (val return for RL, else val loss)

    def __post_init__(self) -> None:
        require(self.every >= 0, "save.every", self.every, ">= 0", "save.every=1000")


@dataclass
class AdaptConfig:
    """``adapt``: how gradient-based algorithms adapt to a task of this run's data, as MAML
    chose it (Finn et al. 2017). MAML, first-order MAML, ANIL, Meta-SGD and MAML++ read their
    ``algo.inner_lr`` / ``inner_steps`` / ``eval_inner_steps`` from here unless their own paper
    chose otherwise (their schemas say which); an algorithm with its own recipe (iMAML,
    Reptile) ignores it.

    Each dataset file (``conf/dataset/<name>.yaml``) writes the values chosen for it. These
    defaults are generic: a run that adapts with them says so at start-up, naming the presets
    that hold a paper's settings (:mod:`metarun.config.provenance`)."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    # null where the algorithm has no inner_steps (e.g. protonets): then nothing reads it.
    eval_inner_steps: int | None = "${oc.select:algo.inner_steps,null}"  # type: ignore[assignment]


_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+")


@dataclass
class RunConfig:
    """The whole run. ``algo``, ``dataset`` and ``model`` are filled from their config groups."""

    algo: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    # Cross-domain evaluation: the test tasks from another dataset (conf/test_dataset/; its
    # shape and normalisation follow dataset's), e.g. test_dataset=image_folder
    # test_dataset.root=DIR; null: the dataset's own test split.
    test_dataset: Any = None
    name: str = "run"  # run dir: outputs/<name>/<time>; conf/config.yaml sets <algo>_<dataset>
    mode: Mode = Mode.train
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = cuda if available
    outer_steps: int = 20000  # the default run (README: its measured time on a 2-core CPU)
    meta_batch_size: int = 25
    meta_optimizer: MetaOptimizerConfig = field(default_factory=MetaOptimizerConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    grad_clip: float | None = None  # max global norm of the meta-gradient; null = no clipping
    # Outer steps with a non-finite meta-loss or meta-gradient skipped (no meta-optimizer step)
    # before training stops as diverged; 0 = stop at the first.
    max_nonfinite_steps: int = 0
    # Also stop as diverged when train/meta_loss exceeds this many times the loss before
    # training (the initial weights' loss on 16+ training tasks, measured once at the start and
    # kept in checkpoints): a divergence that stays finite. Short healthy runs of the presets
    # stayed within 4.5 times it (scripts/bench_divergence.py --part ratios); null = no bound.
    divergence_factor: float | None = 100.0
    # Meta-batches sampled ahead in a background thread (0 = in the loop); results are the same.
    # null: 2 on CUDA (host work and copies overlap the GPU), 0 on the CPU, where the thread
    # would take cores from the step itself (1.35x the step time of the default job on 2 cores).
    prefetch: int | None = None
    # The algorithm's batched meta-step through torch.compile (MAML and its relatives with
    # task batching vmap/auto); a failed compilation warns and runs eagerly. compile_backend:
    # inductor (generated kernels) or e.g. aot_eager (no code generation).
    compile: bool = False
    compile_backend: str = "inductor"
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    # Continue from <run dir>/checkpoints/last.pt (rerun with hydra.run.dir=<that run dir>).
    resume: bool = False
    checkpoint: str | None = None  # mode=eval: the checkpoint file to test

    def __post_init__(self) -> None:
        require(
            _DEVICE.fullmatch(self.device) is not None,
            "device",
            self.device,
            "auto, cpu, cuda or cuda:N",
            "device=cpu",
        )
        require(self.outer_steps >= 1, "outer_steps", self.outer_steps, ">= 1", "outer_steps=1000")
        require(
            self.meta_batch_size >= 1,
            "meta_batch_size",
            self.meta_batch_size,
            ">= 1",
            "meta_batch_size=25",
        )
        require(
            self.prefetch is None or self.prefetch >= 0,
            "prefetch",
            self.prefetch,
            ">= 0",
            "prefetch=2, or prefetch=null for 2 on CUDA and 0 on the CPU",
        )
        require(
            bool(self.compile_backend.strip()),
            "compile_backend",
            self.compile_backend,
            "a torch.compile backend",
            "compile_backend=inductor",
        )
        require(
            self.max_nonfinite_steps >= 0,
            "max_nonfinite_steps",
            self.max_nonfinite_steps,
            ">= 0 (0 = stop at the first non-finite step)",
            "max_nonfinite_steps=0",
        )
        require(
            self.divergence_factor is None or self.divergence_factor > 1,
            "divergence_factor",
            self.divergence_factor,
            "> 1 or null (null = stop on non-finite values only)",
            "divergence_factor=100",
        )
        require(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            self.grad_clip,
            "> 0 or null",
            "grad_clip=10",
        )
        if self.mode is Mode.eval and not self.checkpoint:
            raise ConfigError(
                "checkpoint must be set with mode=eval, got None "
                "(set e.g. checkpoint=outputs/<run>/checkpoints/best.pt)"
            )
        if self.mode is Mode.train and self.checkpoint:
            raise ConfigError(
                f"checkpoint is only read with mode=eval, got checkpoint={self.checkpoint!r} with "
                "mode=train (add mode=eval to test it; to continue training a run use "
                "resume=true hydra.run.dir=<its run dir>)"
            )
        # Each option declares what it fits (metarun.spec.bases).
        check_fits(type(self.algo), type(self.dataset), type(self.model))
        self.algo.check_run(self)
        self.dataset.check_model(self.model)
        if self.test_dataset is not None:
            check_fits(type(self.algo), type(self.test_dataset), type(self.model))
            self.test_dataset.check_model(self.model)
