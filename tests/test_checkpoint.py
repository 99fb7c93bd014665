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


def _state(step: int) -> dict:
    return {
        "step": step,
        "algorithm": {"w": torch.full((2,), float(step))},
        "config": "",
        "options": {},
    }


def test_keep_previous_rotates_last_into_checkpoints_prev(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint(path, _state(1), keep_previous=True)  # nothing to keep yet
    assert not ckpt.previous_path(path).exists()
    ckpt.save_checkpoint(path, _state(2), keep_previous=True)
    ckpt.save_checkpoint(path, _state(3), keep_previous=True)
    assert ckpt.previous_path(path) == tmp_path / "checkpoints.prev" / "last.pt"
    assert ckpt.load_checkpoint(path)["step"] == 3
    assert ckpt.load_checkpoint(ckpt.previous_path(path))["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert [p.name for p in ckpt.previous_path(path).parent.iterdir()] == ["last.pt"]


def test_load_latest_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint(path, _state(1), keep_previous=True)
    ckpt.save_checkpoint(path, _state(2), keep_previous=True)
    assert ckpt.load_latest(path)[0]["step"] == 2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial copy
    with caplog.at_level("WARNING"):
        state, used = ckpt.load_latest(path)
    assert state["step"] == 1 and used == ckpt.previous_path(path)
    assert "using the previous checkpoint" in caplog.text and str(path) in caplog.text
    # Reading the truncated file itself (mode=eval, metarun.load) names it.
    with pytest.raises(ValueError, match=f"'{path}' is not a metarun checkpoint"):
        ckpt.load_checkpoint(path)
    ckpt.previous_path(path).write_bytes(b"")
    with pytest.raises(ValueError, match="the previous checkpoint is unreadable too"):
        ckpt.load_latest(path)


def test_a_folder_is_not_a_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", _state(1))
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint file \(did you mean"):
        ckpt.load_checkpoint(tmp_path / "run")


def test_resume_from_a_truncated_last_pt_uses_the_previous_one(make_config, tiny, tmp_path, caplog):
    """A run whose last.pt was cut short resumes from checkpoints.prev/last.pt with a warning,
    and keeps that good file until a new one replaces it."""
    from metarun.runner import api

    args = [*tiny, "eval.every=0"]  # save.every=3: last.pt at 3 and 6, step 3 kept back
    api.run(make_config(args), tmp_path, overrides=args)
    last = tmp_path / "checkpoints" / "last.pt"
    previous = ckpt.previous_path(last)
    assert ckpt.load_checkpoint(previous)["step"] == 3
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    more = [*args, "outer_steps=9", "resume=true"]
    with caplog.at_level("WARNING"):
        summary = api.run(make_config(more), tmp_path, overrides=more)
    assert "using the previous checkpoint" in caplog.text
    assert summary.step == 9
    assert ckpt.load_checkpoint(last)["step"] == 9
    assert ckpt.load_checkpoint(previous)["step"] == 6  # the rewritten step 6, not the cut file
    import metarun

    with pytest.raises(ValueError, match="is not a metarun checkpoint"):
        last.write_bytes(data[:100])
        metarun.load(last)
