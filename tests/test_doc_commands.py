"""Every ``metarun`` command in the README's and the docs' shell blocks composes into a valid
run (nothing is trained: the commands that need data or a GPU are checked to compose)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from metarun.config import validate

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FLAGS = {"-m", "--multirun", "--cfg", "job", "--help", "--info", "defaults-tree", "--version"}


def commands() -> list[tuple[str, str]]:
    """``(page, command)`` for each ``metarun`` line of a ``bash`` block (continuations joined,
    comments dropped)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" #", 1)[0].strip()
                if line.startswith("metarun ") or line == "metarun":
                    found.append((str(page.relative_to(REPO)), line))
    return found


def overrides(command: str) -> list[str]:
    """The command's overrides as Hydra's compose API takes them: flags dropped, a sweep's
    first value, ``$HOME`` expanded (as bash would)."""
    out = []
    for word in shlex.split(os.path.expandvars(command))[1:]:
        if word in FLAGS or word.startswith("hydra.sweeper.") or "range(" in word:
            continue
        if word.startswith("[") and word.endswith("]"):
            continue  # an optional override, as a page writes it
        if "=" not in word and ("<" in word or ">" in word):
            continue  # a placeholder such as <same overrides>
        word = re.sub(r"<[^<>]*>", "x", word)  # outputs/<run>/...: a placeholder path
        key, sep, value = word.partition("=")
        if sep and "," in value and not value.startswith("["):
            value = value.split(",")[0]
        out.append(f"{key}{sep}{value}")
    return out


COMMANDS = commands()


def test_the_readme_shows_commands():
    assert sum(page == "README.md" for page, _ in COMMANDS) >= 10


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_command_composes(compose_cfg, page, command, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = overrides(command)
    if any(a.startswith(("hydra/launcher=slurm", "+search=", "mode=eval")) for a in args):
        # The launcher and the sweeper are Hydra's own groups; mode=eval composes against the
        # checkpoint's options, which the CLI adds (no checkpoint here): composing is the check.
        compose_cfg(args)
        return
    validate(compose_cfg(args))
