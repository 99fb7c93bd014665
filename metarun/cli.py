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
print ``error: ...`` or Hydra's message naming the key, and exit with status 2; the run dir
Hydra created for such a run is removed again. In a sweep (``-m``) such a mistake in one job's
config fails that job only: it prints ``error: ...``, its ``metarun.log`` holds the line too,
and the sweep's summary marks it ``failed``.

``mode=eval checkpoint=FILE`` composes against the checkpoint's own options (its algo, dataset
and model), so that overrides are checked against the schemas it was trained with.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from metarun.config import ConfigError, Mode, validate
from metarun.config.provenance import adaptation_report, log_report
from metarun.config.store import register_configs
from metarun.sweep.callback import (
    JobFailed,
    UnusableDirError,
    discard_run_dir,
    forget_sweep,
    jobs_started,
)

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


try:
    register_configs()
    _REGISTRY_ERROR: ConfigError | None = None
except ConfigError as _error:  # a user's plugin module ($METARUN_PLUGINS) failed to import
    _REGISTRY_ERROR = _error
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
    except (ConfigError, FileNotFoundError, TrainingDiverged) as error:
        _report(error, in_sweep, hydra_cfg.runtime.output_dir)
        if in_sweep:
            # Already reported: marks the job failed (status and summary) without a traceback.
            raise JobFailed(type(error).__name__, str(error)) from None
        raise SystemExit(
            EXIT_FAILED if isinstance(error, TrainingDiverged) else EXIT_USAGE
        ) from None
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


def _report(error: Exception, in_sweep: bool, run_dir: str) -> None:
    """``error: ...`` on stderr and in the run's log file (a cluster job's log is all its user
    may read). A single run's dir holding nothing of its own is removed instead."""
    message = f"error: {error}"
    print(message, file=sys.stderr)
    if not in_sweep and discard_run_dir(run_dir):
        return
    # To the log files only: Hydra's console handler would print the line a second time.
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _checkpoint_options(argv: list[str]) -> list[str]:
    """``mode=eval checkpoint=FILE``: the group overrides (``algo=... dataset=... model=...``)
    that make Hydra compose the checkpoint's own options, so that an override such as
    ``dataset.n_way=20`` is checked against the schema the checkpoint was trained with rather
    than the default one (sinusoid). Nothing when the command is not such an evaluation.

    Raises:
        ConfigError: an unreadable checkpoint, or a group option other than the checkpoint's.
        FileNotFoundError: no checkpoint file.
    """
    candidates = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return []  # Hydra reports it
    given = {o.key_or_group: o for o in parsed if o.package is None and not o.is_delete()}
    mode, checkpoint = given.get("mode"), given.get("checkpoint")
    if mode is None or checkpoint is None or checkpoint.is_sweep_override():
        return []
    if mode.is_sweep_override() or mode.value() != "eval" or checkpoint.value() is None:
        return []
    from metarun import registry
    from metarun.runner.resume import GROUPS, load_user_checkpoint, other_option_message

    chosen = load_user_checkpoint(str(checkpoint.value()), "checkpoint")["options"]
    added = []
    for group in GROUPS:
        option = chosen.get(group)
        if group == "model" and "model" not in given:
            dataset = given["dataset"].value() if "dataset" in given else chosen.get("dataset")
            if _model_schema(_dataset_model(str(dataset))) == option:
                # The dataset's own model file (e.g. conv4_rgb, a conv4 variant) is what the
                # checkpoint was built from; naming its schema (conv4) would lose the variant.
                continue
        known = registry.options(group)
        if option not in known:
            raise ConfigError(
                f"checkpoint: {group}={option!r} in the checkpoint is not one of {sorted(known)}"
            )
        if group not in given:
            added.append(f"{group}={option}")
        elif given[group].is_sweep_override() or given[group].value() != option:
            raise ConfigError(
                other_option_message(group, given[group].get_value_element_as_str(), option)
            )
    return added


def _dataset_model(dataset: str) -> str | None:
    """The model file ``conf/dataset/<dataset>.yaml`` chooses (``- /model: X``)."""
    path = config_dir() / "dataset" / f"{dataset}.yaml"
    if not path.is_file():
        return None
    for entry in yaml.safe_load(path.read_text()).get("defaults", []):
        if isinstance(entry, dict) and "/model" in entry:
            return str(entry["/model"])
    return None


def _model_schema(model: str | None) -> str | None:
    """The registered model option behind ``conf/model/<model>.yaml`` (a variant file such as
    conv4_rgb names its base in its defaults list)."""
    seen = set()
    while model is not None and model not in seen:
        seen.add(model)
        path = config_dir() / "model" / f"{model}.yaml"
        if not path.is_file():
            return None
        entries = yaml.safe_load(path.read_text()).get("defaults", [])
        for entry in entries:
            if isinstance(entry, str) and entry.startswith("/schema/model/"):
                return entry.split("/")[-1].split("@")[0]
        model = next((e for e in entries if isinstance(e, str) and e != "_self_"), None)
    return None


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
    if sys.argv[1:] == ["--version"]:
        from metarun import __version__

        print(f"metarun {__version__}")
        return
    if _REGISTRY_ERROR is not None:
        print(f"error: {_REGISTRY_ERROR}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    _quiet_secondary_rank(sys.argv)
    _started = False
    forget_sweep()
    try:
        sys.argv += _checkpoint_options(sys.argv)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
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
