"""Checkpoint files: atomic writes, safe loading, exact random-state round trips."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_metarun

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


# ------------------------------------------------------------- through the CLI: best.pt, mode=eval

DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data"))


@pytest.fixture(scope="module")
def unvalidated(tmp_path_factory, tiny) -> Path:
    """The run dir of a tiny CLI run that validated nothing (eval.every=0)."""
    root = tmp_path_factory.mktemp("unvalidated")
    run_dir = root / "run"
    result = run_metarun([*tiny, "eval.every=0", f"hydra.run.dir={run_dir}"], root)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_best_pt_holds_the_last_weights_when_nothing_was_validated(unvalidated):
    """README: `metarun mode=eval checkpoint=.../best.pt` works for every finished run."""
    best = ckpt.load_checkpoint(unvalidated / "checkpoints" / "best.pt")
    last = ckpt.load_checkpoint(unvalidated / "checkpoints" / "last.pt")
    assert best["step"] == last["step"] == 6 and best["best"] is None
    assert all(torch.equal(best["algorithm"][k], v) for k, v in last["algorithm"].items())
    log = (unvalidated / "metarun.log").read_text()
    assert "best.pt holds the last weights (step 6), as last.pt does: nothing was validated" in log


def test_eval_overrides_apply_to_the_checkpoints_config_and_are_recorded(unvalidated, tmp_path):
    run_dir = tmp_path / "eval"
    args = [
        "mode=eval",
        f"checkpoint={unvalidated / 'checkpoints' / 'best.pt'}",
        "device=cpu",
        "log.progress=false",
        "eval.num_tasks=6",
        "eval.batch_size=3",
        "dataset.k_shot=5",  # the test tasks' support size: applied as dataset.eval_k_shot
        "algo.eval_inner_steps=2",
        "outer_steps=6",  # a training key repeating the checkpoint's value changes nothing
        f"hydra.run.dir={run_dir}",
    ]
    result = run_metarun(args, tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    applied = results["overrides"]["applied"]
    assert applied["dataset.eval_k_shot"] == 5 and applied["algo.eval_inner_steps"] == 2
    assert applied["eval.num_tasks"] == 6 and "outer_steps" in results["overrides"]["unchanged"]
    dataset = results["config"]["dataset"]
    assert (dataset["k_shot"], dataset["eval_k_shot"]) == (10, 5)  # trained with 10
    assert results["test"]["inner_steps"] == 2


def test_eval_refuses_an_override_that_changes_what_was_trained(unvalidated, tmp_path):
    """`algo.inner_lr=0.1` used to change the evaluation silently (more cases, in-process:
    tests/test_bad_input.py)."""
    checkpoint = unvalidated / "checkpoints" / "best.pt"
    run_dir = tmp_path / "eval"
    args = ["mode=eval", f"checkpoint={checkpoint}", "algo.inner_lr=0.1"]
    result = run_metarun([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: algo.inner_lr: mode=eval tests the checkpoint as it was trained" in result.stderr
    assert "the checkpoint has algo.inner_lr=0.01, got 0.1" in result.stderr
    assert "mode=eval takes eval.*" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.skipif(
    not (DATA / "omniglot" / "images_background_small1.zip").is_file(),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)
def test_eval_of_an_omniglot_checkpoint_takes_its_task_shape_keys(make_config, tmp_path):
    """`dataset.n_way=...` failed against the default schema (sinusoid has no n_way). A
    metric-based learner tests with other ways than it trained with; the weights here are
    untrained (only the config matters)."""
    from metarun.config import options, to_yaml
    from metarun.runner.build import build_experiment

    config = make_config(
        [
            "algo=protonets",
            "dataset=omniglot",
            "dataset.split=random",
            f"dataset.cache_dir={tmp_path / 'cache'}",
        ]
    )
    experiment = build_experiment(config, with_data=False, device=torch.device("cpu"))
    checkpoint = tmp_path / "best.pt"
    state = {"algorithm": experiment.algorithm.state_dict(), "step": 0}
    torch.save({**state, "config": to_yaml(config), "options": options(config)}, checkpoint)
    run_dir = tmp_path / "eval"
    args = ["mode=eval", f"checkpoint={checkpoint}", "dataset.n_way=3", "dataset.k_query=2"]
    small = ["eval.num_tasks=2", "eval.batch_size=2", "device=cpu", "log.progress=false"]
    result = run_metarun([*args, *small, f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["overrides"]["applied"]["dataset.eval_n_way"] == 3
    assert results["config"]["dataset"]["n_way"] == 5  # as trained
    assert results["config"]["dataset"]["eval_k_query"] == 2
