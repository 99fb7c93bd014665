"""``dataset=image_folder``: few-shot tasks from real folders of PNG/JPEG files of mixed sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metarun.config import ConfigError
from metarun.data import image_folder
from metarun.runner.build import build_tasks
from metarun.testing import write_image_folder as write_classes


def _config(make_config, root: Path, *extra: str):
    return make_config(
        [
            "dataset=image_folder",
            f"dataset.root={root}",
            f"dataset.cache_dir={root.parent / 'cache'}",
            "dataset.image_size=16",
            "dataset.n_way=3",
            "dataset.k_shot=1",
            "dataset.k_query=2",
            "model.hidden=8",
            *extra,
        ]
    )


def test_random_split_is_by_class_disjoint_and_deterministic(tmp_path, make_config):
    names = write_classes(tmp_path / "imgs", 20, 4)
    run = _config(make_config, tmp_path / "imgs")
    pools = image_folder.load_image_folder(run.dataset)
    counts = {s: len(p.names) for s, p in pools.items()}
    assert counts == {"train": 13, "val": 3, "test": 4}  # 0.64 / 0.16 / 0.2 of 20
    split_names = [set(p.names) for p in pools.values()]
    assert set.union(*split_names) == set(names)
    assert sum(len(s) for s in split_names) == len(names)
    assert pools["train"].images.dtype == torch.uint8
    assert tuple(pools["train"].images.shape[1:]) == (16, 16, 3)  # grey files became RGB
    # Another seed, another split; the same seed, the same tasks.
    other = image_folder.load_image_folder(
        _config(make_config, tmp_path / "imgs", "dataset.split_seed=1").dataset
    )
    assert set(other["train"].names) != set(pools["train"].names)
    draws = []
    for _ in range(2):
        tasks = build_tasks(run.dataset)
        draws.append(tasks.train.sample(2, torch.Generator().manual_seed(7)))
    assert torch.equal(draws[0].support_x, draws[1].support_x)
    assert torch.equal(draws[0].query_y, draws[1].query_y)


def test_split_folders_and_split_lists(tmp_path, make_config):
    root = tmp_path / "by_folder"
    for split, count in (("train", 5), ("val", 3), ("test", 4)):
        write_classes(root / split, count, 3, nested=False)
    pools = image_folder.load_image_folder(_config(make_config, root).dataset)
    assert {s: len(p.names) for s, p in pools.items()} == {"train": 5, "val": 3, "test": 4}

    listed = tmp_path / "listed"
    names = write_classes(listed, 10, 3)
    for split, part in (("train", names[:4]), ("val", names[4:7]), ("test", names[7:])):
        (listed / f"{split}.txt").write_text("# class names\n" + "\n".join(part) + "\n")
    pools = image_folder.load_image_folder(_config(make_config, listed).dataset)
    assert pools["train"].names == tuple(names[:4])  # in the lists' order
    assert pools["test"].names == tuple(names[7:])

    (listed / "val.txt").write_text(names[0] + "\n")  # also in train.txt
    with pytest.raises(ValueError, match=r"class 'group0/class00' is in both the train and"):
        image_folder.load_image_folder(_config(make_config, listed).dataset)


def test_decoded_once_then_read_from_the_cache(tmp_path, make_config, monkeypatch):
    write_classes(tmp_path / "imgs", 20, 3)
    run = _config(make_config, tmp_path / "imgs")
    first = image_folder.load_image_folder(run.dataset)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folder, "decode_classes", no_decoding)
    again = image_folder.load_image_folder(run.dataset)
    assert torch.equal(first["train"].images, again["train"].images)


def test_too_few_images_are_refused_by_name_or_skipped(tmp_path, make_config):
    root = tmp_path / "imgs"
    write_classes(root, 20, 3)
    (root / "group0" / "class00" / "img2.png").unlink()  # 2 images: a task draws 3
    run = _config(make_config, root, "dataset.n_way=2")
    with pytest.raises(ValueError, match=r"fewer than the 3 images a task draws.*class00 \(2\)"):
        image_folder.load_image_folder(run.dataset)
    skipped = _config(make_config, root, "dataset.n_way=2", "dataset.few_images=skip")
    pools = image_folder.load_image_folder(skipped.dataset)
    assert "group0/class00" not in {n for p in pools.values() for n in p.names}


def test_a_missing_root_says_what_to_put_there(tmp_path, make_config):
    run = _config(make_config, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"dataset.root=.*nowhere.*each class is a folder"):
        build_tasks(run.dataset)


def test_a_short_run_learns_beyond_chance(tmp_path, train, tiny):
    write_classes(tmp_path / "imgs", 24, 5)
    summary = train(
        tmp_path / "run",
        [
            "algo=protonets",
            "dataset=image_folder",
            f"dataset.root={tmp_path / 'imgs'}",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "dataset.image_size=16",
            "dataset.n_way=3",
            "dataset.k_shot=1",
            "dataset.k_query=3",
            "model.hidden=8",
            "meta_batch_size=1",
            "outer_steps=20",
            "eval.every=0",
            "eval.num_tasks=30",
        ],
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    accuracy = results["test"]["metrics"]["accuracy"]
    assert accuracy["mean"] - accuracy["ci95"] > 1 / 3, accuracy
    assert summary is not None


def test_bad_fractions_name_the_key(make_config, tmp_path):
    with pytest.raises(ConfigError, match="dataset.split_fractions must be three positive"):
        _config(make_config, tmp_path, "dataset.split_fractions=[0.5,0.5,0.5]")
