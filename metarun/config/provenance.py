"""Where each adaptation setting of a run comes from, and which ones nobody chose for it.

A run's inner loop, meta-batch and task shape can come from the command line, an
``experiment=`` preset, the dataset file (``conf/dataset/<name>.yaml``, its ``adapt`` block for
the MAML family), the algorithm file, the defaults an algorithm's paper chose (declared by its
schema: :attr:`~metarun.spec.bases.AlgoSchema.chosen_defaults`), or a generic schema default.
:func:`adaptation_report` traces each value to one of those; the CLI logs the result at start-up
(so it is in ``metarun.log``) and warns when a setting is a generic default, naming the presets
that hold a paper's settings for the same algorithm and dataset.

Example::

    report = adaptation_report(cfg, choices, overrides, config_dir())
    for line in report.lines():
        logger.info(line)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.spec.bases import EPISODIC

logger = logging.getLogger(__name__)

#: Task-shape keys of a few-shot dataset that are reported when the dataset has them.
TASK_SHAPE_KEYS = ("n_way", "k_shot", "k_query")
_UNSET = object()


@dataclass(frozen=True)
class Setting:
    """One reported value: ``key`` (full, e.g. ``algo.inner_steps``), its value, where it was
    set, and whether somebody chose it for this run's algorithm and data."""

    key: str
    value: Any
    source: str
    chosen: bool


@dataclass
class AdaptationReport:
    """The settings of one run, with the presets that would give a paper's settings."""

    algo: str
    dataset: str
    settings: list[Setting] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)

    @property
    def generic(self) -> list[Setting]:
        """The settings that are generic defaults (nobody chose them for this data)."""
        return [s for s in self.settings if not s.chosen]

    def lines(self) -> list[str]:
        """The report, one line per setting (what the CLI logs)."""
        if not self.settings:
            return []
        width = max(len(f"{s.key} = {s.value}") for s in self.settings)
        head = f"adaptation settings of algo={self.algo} on dataset={self.dataset}:"
        return [head] + [
            f"  {f'{s.key} = {s.value}':<{width}}  from {s.source}" for s in self.settings
        ]

    def warning(self) -> str | None:
        """A sentence naming the generic settings and where the paper's are (None: none)."""
        generic = self.generic
        if not generic:
            return None
        keys = ", ".join(f"{s.key}={s.value}" for s in generic)
        if self.presets:
            fix = "for a paper's settings use " + " or ".join(
                f"experiment={p}" for p in self.presets
            )
        else:
            fix = "no preset holds settings for this pair: set them on the command line"
        return (
            f"generic defaults, not chosen for algo={self.algo} on dataset={self.dataset}: "
            f"{keys} ({fix})"
        )


def cli_keys(overrides: Iterable[str]) -> set[str]:
    """The keys set by command-line overrides (``+``, ``++`` and ``~`` prefixes removed;
    group choices such as ``algo=fomaml`` are returned too, and match no value key)."""
    keys = set()
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].strip()
        if key:
            keys.add(key)
    return keys


def _load(path: Path) -> DictConfig:
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        return OmegaConf.create({})
    return loaded


def _defaults_entries(data: DictConfig) -> list[Any]:
    entries = data.get("defaults") or []
    return list(entries)


def experiment_chain(conf: Path, name: str) -> list[tuple[str, DictConfig]]:
    """The experiment file ``name`` and the experiment files it includes, in order of
    precedence (the file that wins first): Hydra merges a file's includes in their order and
    the file itself at its ``_self_`` (last when not listed)."""

    def merge_order(current: str, seen: frozenset[str]) -> list[tuple[str, DictConfig]]:
        path = conf / "experiment" / f"{current}.yaml"
        if not path.is_file() or current in seen:
            return []
        data = _load(path)
        entries = [e for e in _defaults_entries(data) if isinstance(e, str)]
        if "_self_" not in entries:
            entries.append("_self_")
        order: list[tuple[str, DictConfig]] = []
        for entry in entries:
            if entry == "_self_":
                order.append((current, data))
            else:
                order += merge_order(entry, seen | {current})
        return order

    return list(reversed(merge_order(name, frozenset())))


def experiment_choices(conf: Path, name: str) -> dict[str, str]:
    """The groups a preset chooses (``override /algo: reptile`` -> ``{"algo": "reptile"}``),
    including those of the presets it includes."""
    chosen: dict[str, str] = {}
    for _, data in reversed(experiment_chain(conf, name)):
        for entry in _defaults_entries(data):
            if isinstance(entry, Mapping) or OmegaConf.is_dict(entry):
                for key, value in dict(entry).items():
                    group = str(key).replace("override", "").strip().lstrip("/")
                    chosen[group] = str(value)
    return chosen


def presets_for(conf: Path, algo: str, dataset: str) -> list[str]:
    """The presets for ``algo`` on ``dataset``: those that choose both, and for MAML those that
    choose only the dataset (their settings are MAML's)."""
    found = []
    for path in sorted((conf / "experiment").glob("*.yaml")):
        chosen = experiment_choices(conf, path.stem)
        if chosen.get("dataset") != dataset:
            continue
        if chosen.get("algo", "maml") == algo:
            found.append(path.stem)
    return found


def _sets(data: DictConfig, key: str) -> bool:
    return OmegaConf.select(data, key, default=_UNSET, throw_on_resolution_failure=False) is not (
        _UNSET
    )


def _raw(cfg: DictConfig, key: str) -> Any:
    """The value of ``key`` before interpolation (``"${adapt.inner_lr}"``)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return _UNSET
    node = parent._get_node(leaf)
    return node._value() if node is not None else _UNSET  # type: ignore[union-attr]


def _target(expression: str, key: str) -> str | None:
    """The key an interpolation such as ``${adapt.inner_lr}``, ``${.inner_steps}`` or
    ``${oc.select:algo.inner_steps,null}`` points to (None: not a plain reference)."""
    body = expression.strip()
    if not (body.startswith("${") and body.endswith("}")):
        return None
    body = body[2:-1]
    if body.startswith("oc.select:"):
        body = body[len("oc.select:") :].split(",", 1)[0]
    if ":" in body or "${" in body:
        return None
    if body.startswith("."):
        parent = key.rpartition(".")[0]
        return f"{parent}.{body[1:]}" if parent else body[1:]
    return body


class _Tracer:
    def __init__(
        self, cfg: DictConfig, choices: Mapping[str, Any], overrides: Sequence[str], conf: Path
    ) -> None:
        self.cfg = cfg
        self.algo = str(choices.get("algo"))
        self.dataset = str(choices.get("dataset"))
        self.cli = cli_keys(overrides)
        experiment = choices.get("experiment")
        self.experiment = experiment_chain(conf, str(experiment)) if experiment else []
        algo_file = conf / "algo" / f"{self.algo}.yaml"
        dataset_file = conf / "dataset" / f"{self.dataset}.yaml"
        self.algo_file = _load(algo_file) if algo_file.is_file() else OmegaConf.create({})
        self.dataset_file = _load(dataset_file) if dataset_file.is_file() else OmegaConf.create({})
        self.schema = OmegaConf.get_type(cfg.algo)

    def source(self, key: str, depth: int = 0) -> tuple[str, bool]:
        if key in self.cli:
            return "the command line", True
        for name, data in self.experiment:
            if _sets(data, key):
                return f"experiment={name}", True
        raw = _raw(self.cfg, key)
        target = _target(raw, key) if isinstance(raw, str) else None
        if target is not None and depth < 4:
            text, chosen = self.source(target, depth + 1)
            return (f"{text} ({target})" if depth == 0 else text), chosen
        group, _, leaf = key.partition(".")
        if group == "algo" and _sets(self.algo_file, leaf):
            return f"conf/algo/{self.algo}.yaml", True
        if _sets(self.dataset_file, key):
            return f"conf/dataset/{self.dataset}.yaml", True
        if group == "algo":
            chosen_defaults = getattr(self.schema, "chosen_defaults", {})
            chosen_for = getattr(self.schema, "chosen_for", ())
            if leaf in chosen_defaults and (not chosen_for or self.dataset in chosen_for):
                return f"algo={self.algo}'s default, {chosen_defaults[leaf]}", True
        if group == "dataset":
            return f"dataset={self.dataset}'s default", True
        return "a generic default", False


def adaptation_report(
    cfg: DictConfig, choices: Mapping[str, Any], overrides: Sequence[str], conf: Path
) -> AdaptationReport:
    """Trace the adaptation settings of a composed (unresolved) config to their sources.

    Args:
        cfg: the config as Hydra composed it.
        choices: the chosen option of each group (``hydra.runtime.choices``), with
            ``experiment`` (None when no preset is chosen).
        overrides: the command line's overrides (``hydra.overrides.task``).
        conf: the config directory (:func:`metarun.cli.config_dir`).
    """
    tracer = _Tracer(cfg, choices, overrides, conf)
    report = AdaptationReport(tracer.algo, tracer.dataset)
    keys = [f"algo.{k}" for k in getattr(tracer.schema, "adaptation_keys", ()) if k in cfg.algo]
    if EPISODIC in getattr(tracer.schema, "task_kinds", ()):
        keys.append("meta_batch_size")
        keys += [f"dataset.{k}" for k in TASK_SHAPE_KEYS if k in cfg.dataset]
    for key in keys:
        try:
            value = OmegaConf.select(cfg, key)
        except OmegaConfBaseException:
            value = _raw(cfg, key)
        source, chosen = tracer.source(key)
        report.settings.append(Setting(key, value, source, chosen))
    if report.generic:
        report.presets = presets_for(conf, tracer.algo, tracer.dataset)
    return report


def log_report(report: AdaptationReport) -> None:
    """Log the report (INFO) and its warning (WARNING): to the console and ``metarun.log``."""
    for line in report.lines():
        logger.info(line)
    warning = report.warning()
    if warning:
        logger.warning(warning)
