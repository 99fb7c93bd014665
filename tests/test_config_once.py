"""Config written once: an option's YAML holds only what differs from its schema's defaults, and
no two files under conf/ are the same."""

from __future__ import annotations

import dataclasses
import itertools

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
    assert data.get("defaults", [None])[0] == f"/schema/{group}/{name}@_here_"
    fields = {f.name: f for f in dataclasses.fields(schema)}
    repeated = [
        key
        for key, value in data.items()
        if key != "defaults" and key in fields and _default(fields[key]) == value
    ]
    assert not repeated, f"{path.name} repeats its schema's defaults for {repeated}"


def test_no_two_config_files_are_the_same():
    files = sorted(config_dir().rglob("*.yaml"))
    twins = [
        (a.relative_to(config_dir()), b.relative_to(config_dir()))
        for a, b in itertools.combinations(files, 2)
        if a.read_bytes() == b.read_bytes()
    ]
    assert not twins
