"""The documentation site builds in strict mode (a broken link or anchor, a page left out of the
nav, an API page naming a missing object or a docstring reference to one fails), and each
algorithm page lists every key of its schema."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (make install does)",
)
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    api = (site / "api" / "unroll" / "index.html").read_text()
    # mkdocstrings rendered the library, not an empty page.
    assert 'id="metarun.unroll.functional.inner_loop"' in api
    assert 'id="metarun.unroll.innerloop_ctx"' in api
    learner = (site / "api" / "learner" / "index.html").read_text()
    assert 'id="metarun.runner.learner.load"' in learner
    # docs/_ext is read by the build, not published.
    assert not (site / "_ext").exists()


def _keys(schema: type, parent: type | None = None) -> set[str]:
    own = {f.name for f in dataclasses.fields(schema)}
    return own - ({f.name for f in dataclasses.fields(parent)} if parent else set())


def test_algorithm_pages_list_every_schema_key():
    from metarun.algorithms.anil import ANILConfig
    from metarun.algorithms.fomaml import FOMAMLConfig
    from metarun.algorithms.imaml import IMAMLConfig
    from metarun.algorithms.l2rw import ERMConfig, L2RWConfig
    from metarun.algorithms.maml import MAMLConfig
    from metarun.algorithms.mamlpp import MAMLPPConfig
    from metarun.algorithms.metasgd import MetaSGDConfig
    from metarun.algorithms.mwn import MWNConfig
    from metarun.algorithms.protonets import ProtoNetsConfig
    from metarun.algorithms.reptile import ReptileConfig

    pages = {
        "maml.md": [_keys(s) for s in (MAMLConfig, FOMAMLConfig, MetaSGDConfig, MAMLPPConfig)],
        # ANIL's page lists its own key and points to MAML's for the rest.
        "anil.md": [_keys(ANILConfig, MAMLConfig)],
        "imaml.md": [_keys(IMAMLConfig)],
        "reptile.md": [_keys(ReptileConfig)],
        "protonets.md": [_keys(ProtoNetsConfig)],
        "l2rw.md": [_keys(ERMConfig), _keys(L2RWConfig)],
        "mwn.md": [_keys(MWNConfig)],
    }
    missing = {}
    for page, key_sets in pages.items():
        text = (DOCS / "algorithms" / page).read_text()
        absent = sorted({k for keys in key_sets for k in keys if f"`{k}`" not in text})
        if absent:
            missing[page] = absent
    assert not missing, f"keys of the schema not on the algorithm's page: {missing}"
