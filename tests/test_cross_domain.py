"""Cross-domain tests: train and validate on one dataset, test on another (test_dataset), in a
training run and on an existing checkpoint (mode=eval), with the usual test protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from metarun.runner.build import build_experiment
from metarun.testing import write_image_folder as write_classes

METARUN = str(Path(sys.executable).with_name("metarun"))
SHAPE = [
    "dataset.image_size=16",
    "dataset.n_way=3",
    "dataset.k_shot=1",
    "dataset.k_query=2",
    "model.hidden=8",
]


def _data(tmp_path: Path) -> tuple[Path, Path]:
    train, other = tmp_path / "train_imgs", tmp_path / "other_imgs"
    write_classes(train, 20, 3)
    write_classes(other, 7, 3, nested=False)
    return train, other


def test_test_tasks_come_from_the_test_dataset_with_the_training_shape(tmp_path, make_config):
    train, other = _data(tmp_path)
    run = make_config(
        [
            "dataset=image_folder",
            f"dataset.root={train}",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            *SHAPE,
            "test_dataset=image_folder",
            f"test_dataset.root={other}",
        ]
    )
    assert run.test_dataset.test_only and run.test_dataset.image_size == 16
    assert run.test_dataset.n_way == 3 and run.test_dataset.mean == run.dataset.mean
    experiment = build_experiment(run)
    assert experiment.tasks.test.num_classes == 7  # every class of the other folder
    assert experiment.tasks.val.num_classes == 3  # validation stays in-domain
    assert experiment.tasks.train.num_classes == 13


def test_a_checkpoint_is_tested_on_other_data_through_the_cli(tmp_path):
    train, other = _data(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [f"dataset.cache_dir={tmp_path / 'cache'}", "log.progress=false", "device=cpu"]
    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [METARUN, "algo=protonets", "dataset=image_folder", f"dataset.root={train}", *SHAPE,
         *common, "meta_batch_size=1", "outer_steps=4", "eval.every=0", "eval.num_tasks=5",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    eval_dir = tmp_path / "eval"
    tested = subprocess.run(
        [METARUN, "mode=eval", f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
         "test_dataset=image_folder", f"test_dataset.root={other}", "eval.num_tasks=12",
         *common, f"hydra.run.dir={eval_dir}"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["test"]["num_tasks"] == 12
    assert results["config"]["test_dataset"]["root"] == str(other)
    assert "test_dataset" in results["overrides"]["applied"]
    accuracy = results["test"]["metrics"]["accuracy"]
    assert 0 <= accuracy["mean"] <= 1 and accuracy["ci95"] > 0
