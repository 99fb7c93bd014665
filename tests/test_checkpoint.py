"""Checkpoint files: atomic writes, safe loading, exact random-state round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from metarun.runner import checkpoint as ckpt


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1, "algorithm": {}, "config": "", "options": {}})
    ckpt.save_checkpoint(path, {"step": 2, "algorithm": {}, "config": "", "options": {}})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert ckpt.load_checkpoint(path)["step"] == 2


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1, "algorithm": {}, "config": "", "options": {}})

    def crash(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a metarun checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    for name, content in (("notes.txt", b"not a checkpoint"), ("junk.pt", b"hi\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="not a metarun checkpoint"):
            ckpt.load_checkpoint(tmp_path / name)


def _draw(generator: torch.Generator) -> list[float]:
    return [
        float(torch.rand(1)),
        random.random(),
        float(np.random.rand()),
        float(torch.rand(1, generator=generator)),
    ]


def test_rng_state_round_trip_through_a_file(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    _draw(generator)
    state = ckpt.rng_state(generator.get_state())
    # weights_only loading must accept every entry (no pickled NumPy objects).
    ckpt.save_checkpoint(
        tmp_path / "c.pt", {"rng": state, "algorithm": {}, "step": 0, "config": "", "options": {}}
    )
    expected = _draw(generator)
    _draw(generator)
    restored = torch.Generator()
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "c.pt")["rng"], restored)
    assert _draw(restored) == expected
