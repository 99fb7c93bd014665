"""``metarun``: the command line. Compose (Hydra) -> validate -> build -> run; nothing else.

Examples::

    metarun                                   # MAML on sinusoid regression (20,000 steps, CPU)
    metarun algo=maml dataset=omniglot        # Finn et al. 2017, Omniglot 5-way 1-shot
    metarun experiment=omniglot_20way_5shot   # a paper preset (conf/experiment/)
    metarun mode=eval checkpoint=outputs/.../checkpoints/best.pt
    metarun -m algo.inner_lr=0.1,0.4 seed=0,1,2   # a sweep (metarun/sweep/)
    metarun --cfg job                         # print the composed config
    metarun --help                            # every group, option and key

User mistakes (unknown option or key, wrong type, impossible value, missing data or checkpoint)
print ``error: ...`` or Hydra's message naming the key, and exit with status 2. In a sweep
(``-m``) such a mistake in one job's config fails that job only (status ``failed`` in the
sweep's summary).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metarun.config import ConfigError, Mode, validate
from metarun.config.provenance import adaptation_report, log_report
from metarun.config.store import register_configs
from metarun.sweep.callback import UnusableDirError, forget_sweep, jobs_started

EXIT_FAILED = 1  # the run itself failed (training diverged)
EXIT_USAGE = 2  # bad configuration or input, as argparse does
EXIT_INTERRUPTED = 130  # SIGINT, as a shell reports it; SIGTERM (preemption) exits 0
_BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # jobs in this process


def config_dir() -> Path:
    """``conf/``: shipped inside the package in a wheel (``metarun/conf``), or at the top of a
    source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml next to or above {package}; reinstall metarun")


register_configs()
_started = False  # set once Hydra has composed a config and called the task function


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _app(cfg: DictConfig) -> float:
    """Returns the sweep objective (:func:`metarun.sweep.summary.objective`, lower is better),
    what hydra-optuna-sweeper minimises."""
    global _started
    _started = True
    # Imported here so that `metarun --help` and compose errors stay fast.
    from metarun.runner.api import run
    from metarun.runner.trainer import TrainingDiverged
    from metarun.sweep.preemption import Preemption
    from metarun.sweep.summary import objective, write_summary

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        config = validate(cfg)
        if config.mode is Mode.train and int(os.environ.get("RANK", "0") or 0) == 0:
            log_report(
                adaptation_report(
                    cfg, hydra_cfg.runtime.choices, list(hydra_cfg.overrides.task), config_dir()
                )
            )
        # Submitit's preemption signal saves a checkpoint before the job is requeued; a sweep
        # job continues from a checkpoint in its own run dir (a requeued or re-run job).
        with Preemption() as preemption:
            summary = run(
                config,
                hydra_cfg.runtime.output_dir,
                overrides=list(hydra_cfg.overrides.task),
                auto_resume=in_sweep,
            )
    except (ConfigError, FileNotFoundError) as error:
        if in_sweep:
            raise  # this job fails; Hydra reports it, the summary lists it
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except TrainingDiverged as error:
        if in_sweep:
            raise  # status "failed" with this message in the sweep's summary
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    print(summary.format())
    # Ctrl-C ends a sweep too, and so does SIGTERM when the sweep runs in this process (basic
    # launcher): the same command with hydra.sweep.dir=<sweep dir> continues it.
    if summary.stopped_by == "SIGINT" or (
        in_sweep and summary.stopped_by == "SIGTERM" and hydra_cfg.launcher._target_ == _BASIC
    ):
        if in_sweep:
            write_summary(hydra_cfg.sweep.dir)  # Hydra's callbacks do not run on SystemExit
        raise SystemExit(EXIT_INTERRUPTED if summary.stopped_by == "SIGINT" else 0)
    preemption.requeue_if_stopped(summary.stopped_by)
    return objective(summary.results)


def _quiet_secondary_rank(argv: list[str]) -> None:
    """Under ``torchrun`` every rank starts this app. Ranks other than 0 write nothing of their
    own: no Hydra run dir or log file (the runner uses rank 0's run dir)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        return
    scratch = Path(tempfile.gettempdir()) / f"metarun-rank{rank}"
    argv[:] = [a for a in argv if not a.startswith("hydra.run.dir=")] + [
        f"hydra.run.dir={scratch}",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
    ]


def main() -> None:
    """Console-script entry point (``metarun``)."""
    global _started
    _quiet_secondary_rank(sys.argv)
    _started = False
    forget_sweep()
    try:
        _app()
    except UnusableDirError as error:  # raised in a Hydra callback, before any job
        print(f"error: {error.message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except SystemExit as exit_:
        # Hydra reports composition errors (unknown option or key, wrong type) itself and exits
        # with 1, the same status as a crash or a failed sweep job; before any task or sweep
        # job started it can only be the former.
        if exit_.code == 1 and not _started and not jobs_started():
            raise SystemExit(EXIT_USAGE) from None
        raise


if __name__ == "__main__":
    main()
