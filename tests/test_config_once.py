"""Config written once: an option's YAML holds only what differs from its schema's defaults, no
two files under conf/ are the same but for comments, none only points to another, and the files
grow as algorithms + datasets + models + presets (no folder of algorithm x dataset files)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import yaml

from metarun import registry
from metarun.cli import config_dir

OPTIONS = [(g, n, o.schema) for g in registry.GROUPS for n, o in registry.options(g).items()]


def _default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    return getattr(value, "value", value)  # enum members are written by value


@pytest.mark.parametrize(("group", "name", "schema"), OPTIONS, ids=lambda v: str(v))
def test_option_yaml_holds_only_what_differs_from_its_schema(group, name, schema):
    path = config_dir() / group / f"{name}.yaml"
    assert path.is_file(), f"registered option {group}={name} has no {path}"
    data = yaml.safe_load(path.read_text()) or {}
    # A dataset file is global: its own keys under `dataset:`, beside the run-level settings
    # that come with it.
    package = "dataset" if group == "dataset" else "_here_"
    assert data.get("defaults", [None])[0] == f"/schema/{group}/{name}@{package}"
    if group == "dataset":
        data = data.get("dataset") or {}
    fields = {f.name: f for f in dataclasses.fields(schema)}
    repeated = [
        key
        for key, value in data.items()
        if key != "defaults" and key in fields and _default(fields[key]) == value
    ]
    assert not repeated, f"{path.name} repeats its schema's defaults for {repeated}"


def _content(path: Path) -> object:
    """What a YAML file says, comments and layout aside."""
    return yaml.safe_load(path.read_text())


def test_no_two_config_files_say_the_same():
    files = sorted(config_dir().rglob("*.yaml"))
    twins = [
        (a.relative_to(config_dir()), b.relative_to(config_dir()))
        for a, b in itertools.combinations(files, 2)
        if _content(a) == _content(b)
    ]
    assert not twins


def test_no_config_file_only_points_to_another():
    pointers = [
        path.relative_to(config_dir())
        for path in sorted(config_dir().rglob("*.yaml"))
        if set(_content(path) or {}) <= {"defaults"}
        and all(
            isinstance(entry, str) and entry != "_self_" and not entry.startswith("/schema/")
            for entry in (_content(path) or {}).get("defaults", [])
            if entry != "_self_"
        )
    ]
    assert not pointers, f"files that only point to another: {pointers}"


def test_config_files_grow_as_a_sum_not_a_product():
    """Folders mirror the code (algo, dataset, model; test_dataset: a dataset as cross-domain
    test data), plus presets and Hydra's own groups; an algorithm needs one YAML, a dataset one
    YAML."""
    folders = {p.name for p in config_dir().iterdir() if p.is_dir()}
    assert folders == {"algo", "dataset", "model", "test_dataset", "experiment", "hydra", "search"}
    for group in ("algo", "dataset"):
        names = {p.stem for p in (config_dir() / group).glob("*.yaml")}
        assert names == set(registry.options(group)), group
    algos = set(registry.options("algo"))
    datasets = set(registry.options("dataset"))
    # Presets (experiment/) are named after what they run; no other file is per pair.
    products = [
        p.name
        for p in config_dir().rglob("*.yaml")
        if p.parent.name != "experiment"
        for a in algos
        for d in datasets
        if p.stem in (f"{a}_{d}", f"{d}_{a}")
    ]
    assert not products
    assert len(list(config_dir().rglob("*.yaml"))) < 96  # 96 before the redesign
