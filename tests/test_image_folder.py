"""``dataset=image_folder``: few-shot tasks from real folders of PNG/JPEG files of mixed sizes."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.config import ConfigError
from metarun.data import image_folder, omniglot
from metarun.data.fewshot import fixed_tasks
from metarun.runner import api
from metarun.runner.build import build_tasks
from metarun.runner.resume import eval_config, load_user_checkpoint
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


def test_grey_and_channel_keys_are_checked(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.channels must be 1 \(grey\) or 3 \(RGB\)"):
        _config(make_config, tmp_path, "dataset.channels=2")
    with pytest.raises(ConfigError, match=r"dataset.mean must be 1 values.*dataset.mean=\[0.0\]"):
        _config(make_config, tmp_path, "dataset.channels=1", "model.in_channels=1")


def test_grey_inverted_pools_and_transform(tmp_path, make_config):
    write_classes(tmp_path / "imgs", 16, 3)
    grey = ["dataset.channels=1", "dataset.mean=[0]", "dataset.std=[1]", "model.in_channels=1"]
    rgb = image_folder.load_image_folder(_config(make_config, tmp_path / "imgs").dataset)
    run = _config(make_config, tmp_path / "imgs", *grey, "dataset.invert=true")
    pools = image_folder.load_image_folder(run.dataset)
    for split, pool in pools.items():
        assert pool.names == rgb[split].names
        assert tuple(pool.images.shape[1:]) == (16, 16, 1)
    # Each image as Pillow's 8-bit grey, LANCZOS-resized, inverted; a second cache entry.
    name = pools["train"].names[0]
    files = sorted((tmp_path / "imgs" / name).iterdir())
    expected = [
        255 - np.array(Image.open(f).convert("L").resize((16, 16), Image.Resampling.LANCZOS))
        for f in files
    ]
    assert torch.equal(
        pools["train"].images[: len(files), ..., 0], torch.tensor(np.stack(expected))
    )
    assert len(list((tmp_path / "cache").glob("image_folder_*.pt"))) == 2
    first = sorted((tmp_path / "imgs").rglob("*.png"))[0]
    assert run.dataset.transform(first).shape == (1, 16, 16)


# ------------------------------------------------------ an Omniglot checkpoint on a PNG folder


@pytest.fixture
def one_thread():
    """One intra-op thread: a 16-filter conv net on 28x28 images gains nothing from more and
    loses much to a busy machine's scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _omniglot_tree(zip_path: Path, dest: Path) -> None:
    """The archive's images as class folders ``dest/<Alphabet>/<characterNN>/*.png``."""
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            if name.endswith(".png"):
                target = dest / Path(*Path(name).parts[1:])  # without the archive's stem
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))


@pytest.mark.skipif(not os.environ.get("METARUN_DATA"), reason="needs $METARUN_DATA/omniglot")
def test_omniglot_checkpoint_tests_the_same_on_a_folder_of_its_pngs(
    tmp_path, make_config, one_thread
):
    """A checkpoint trained on dataset=omniglot, tested on the same test characters through
    dataset=omniglot and through test_dataset=image_folder on a folder of the archive's PNGs
    (grey, inverted, no normalisation: Omniglot's preprocessing): the same tasks, bit for bit,
    so the same accuracy."""
    small1 = Path(os.environ["METARUN_DATA"]) / "omniglot" / "images_background_small1.zip"
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / small1.name).symlink_to(small1)
    _omniglot_tree(small1, tmp_path / "pngs")
    # The omniglot split's classes as split lists, in its order: the same pools, so the same
    # tasks from the same evaluation seed.
    sources = omniglot._find_sources(tmp_path / "omniglot")
    characters = omniglot._index_all(sources)
    parts = omniglot._split_keys(
        list(characters), characters, "random", (0.7, 0.15, 0.15), 1, tmp_path
    )
    for split, keys in parts.items():
        (tmp_path / "pngs" / f"{split}.txt").write_text("".join(f"{a}/{c}\n" for a, c in keys))

    common = [
        "algo=protonets",
        "dataset=omniglot",
        "log.progress=false",
        "log.tensorboard=false",
        "device=cpu",
        "eval.num_tasks=12",
        "eval.batch_size=12",
    ]
    data = [
        f"dataset.root={tmp_path / 'omniglot'}",
        "dataset.split=random",
        "dataset.rotations=false",
        "dataset.k_query=5",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    ]
    # A few steps at a high rate: well above chance, the seconds going to the two evaluations.
    train_args = [
        *common, *data, "model.hidden=16", "outer_steps=15", "meta_batch_size=2",
        "meta_optimizer.lr=0.01", "eval.every=0", "save.every=0", "eval.num_tasks=1",
    ]  # fmt: skip
    api.run(make_config(train_args), tmp_path / "train", overrides=train_args)
    checkpoint = tmp_path / "train" / "checkpoints" / "last.pt"

    folder = [
        "test_dataset=image_folder",
        f"test_dataset.root={tmp_path / 'pngs'}",
        f"test_dataset.cache_dir={tmp_path / 'cache'}",
        "test_dataset.test_only=false",
        "test_dataset.split=files",
        "test_dataset.invert=true",
    ]
    accuracy = {}
    for name, extra in (("omniglot", []), ("folder", folder)):
        args = [*common, "mode=eval", f"checkpoint={checkpoint}", *extra]
        run = make_config(args)
        # The config mode=eval tests with: the checkpoint's, with these overrides applied.
        saved, _ = eval_config(load_user_checkpoint(str(checkpoint), "checkpoint"), run, args)
        if name == "folder":
            assert saved.test_dataset.channels == 1 and saved.test_dataset.mean == [0.0]
        tasks = build_tasks(saved.test_dataset if name == "folder" else saved.dataset).test
        first = next(fixed_tasks(tasks, 5, 5, seed=run.eval.test_seed))
        api.run(run, tmp_path / name, overrides=args)
        results = json.loads((tmp_path / name / "results.json").read_text())
        accuracy[name] = (first, results["test"]["metrics"]["accuracy"])
    (tasks_a, omni), (tasks_b, from_folder) = accuracy["omniglot"], accuracy["folder"]
    for a, b in zip(tasks_a.tensors(), tasks_b.tensors(), strict=True):
        assert torch.equal(a, b)
    assert omni["mean"] > 0.2 + omni["ci95"], omni  # above 5-way chance
    assert from_folder["mean"] == omni["mean"] and from_folder["ci95"] == omni["ci95"]
