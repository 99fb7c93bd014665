"""The Python API on raw images: ``learner.transform`` and ``adapt`` / ``predict`` on PIL
images, image files, their bytes or uint8 arrays prepare them exactly as the checkpoint's data
loader prepares its files, so a character's PNG gives the loader's tensor and the same
predictions, bit for bit."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_env, run_metarun
from PIL import Image

import metarun
from metarun.data import omniglot
from metarun.data.fewshot import FewShotTasks
from metarun.data.images import normalise, resize_images
from metarun.data.miniimagenet import MiniImageNetConfig

DATA = Path(os.environ.get("METARUN_DATA", "/work/shared/data"))
OMNIGLOT = DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not list(OMNIGLOT.glob("images_background*")),
    reason="Omniglot archives not under $METARUN_DATA/omniglot",
)


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MAML checkpoint trained on real Omniglot (split=random), and its image cache."""
    root = tmp_path_factory.mktemp("learner")
    cache = root / "cache"
    result = run_metarun(
        [
            "dataset=omniglot",
            "dataset.split=random",
            f"dataset.cache_dir={cache}",
            "model.hidden=8",
            "outer_steps=3",
            "meta_batch_size=2",
            "algo.task_batching=loop",
            "eval.every=0",
            "eval.num_tasks=2",
            "eval.batch_size=2",
            "save.every=0",
            "log.progress=false",
            "device=cpu",
            f"hydra.run.dir={root / 'run'}",
        ],
        root,
        env=cli_env(METARUN_DATA=str(DATA)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return root / "run" / "checkpoints" / "last.pt", cache


def _five_test_characters(cache: Path) -> tuple[torch.Tensor, list[list[bytes]]]:
    """The loader's test pool (no rotations) and, for its first five characters, the PNG bytes
    of each drawer's image, read from the archives, in the pool's order."""
    pools = omniglot.load_omniglot(OMNIGLOT, split="random", rotations=False, cache_dir=cache)
    sources = omniglot._find_sources(OMNIGLOT)
    characters = omniglot._index_all(sources)
    parts = omniglot._split_keys(
        list(characters), characters, "random", (0.7, 0.15, 0.15), 1, OMNIGLOT
    )
    pngs: list[list[bytes]] = []
    for key in parts["test"][:5]:
        character = characters[key]
        with zipfile.ZipFile(character.source.path) as archive:
            pngs.append([archive.read(name) for name in character.files])
    return pools["test"], pngs


@needs_omniglot
def test_adapt_on_png_files_predicts_as_on_the_loaders_tensors(omniglot_run, tmp_path):
    checkpoint, cache = omniglot_run
    pool, pngs = _five_test_characters(cache)
    learner = metarun.load(checkpoint)
    # Every image the loader holds for these characters, from its PNG alone.
    for c, images in enumerate(pngs):
        for m, png in enumerate(images):
            assert torch.equal(learner.transform(png), pool[c, m]), (c, m)

    labels = [0, 1, 2, 3, 4]
    support = [images[0] for images in pngs]  # drawer 1 of each character: 5-way 1-shot
    queries = [images[q] for images in pngs for q in (1, 2, 3)]
    from_files = learner.adapt(support, labels)(queries)
    tensors = learner.adapt(pool[:5, 0], torch.tensor(labels))(pool[:5, 1:4].flatten(0, 1))
    assert from_files.shape == (15, 5)
    assert torch.equal(from_files, tensors)

    # The same image as a path, a PIL image or a uint8 array (black strokes on white, as drawn).
    path = tmp_path / "character.png"
    path.write_bytes(pngs[2][4])
    with Image.open(path) as image:
        image.load()
        expected = pool[2, 4]
        assert torch.equal(learner.transform(image), expected)
        assert torch.equal(learner.transform(np.array(image.convert("L"))), expected)
    assert torch.equal(learner.transform(path), expected)
    assert torch.equal(learner.transform(str(path)), expected)
    assert torch.equal(
        learner.transform(torch.from_numpy(np.array(Image.open(path).convert("L")))), expected
    )


@needs_omniglot
def test_inputs_that_are_not_images_are_refused(omniglot_run):
    learner = metarun.load(omniglot_run[0])
    with pytest.raises(TypeError, match="must be uint8"):
        learner.transform(np.zeros((28, 28), dtype=np.float32))
    with pytest.raises(TypeError, match="wrap one image in a list"):
        learner.adapt(b"not a list", [0])
    with pytest.raises(ValueError, match="not an image file"):
        learner.transform(b"not a png")


def test_a_dataset_without_images_says_to_pass_tensors(train, tmp_path):
    train(tmp_path, ["eval.every=0"])
    learner = metarun.load(tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(TypeError, match="dataset=sinusoid has no image preprocessing"):
        learner.transform(np.zeros((4, 4), dtype=np.uint8))
    # Tensors go through as before.
    predict = learner.adapt(torch.zeros(5, 1), torch.zeros(5, 1))
    assert predict(torch.zeros(3, 1)).shape == (3, 1)


def test_rgb_datasets_prepare_images_as_their_tasks_do():
    """miniImageNet and its siblings: a uint8 image gives what FewShotTasks gives the same
    pixels (bit for bit), resized like the array loaders when its size differs; files are
    decoded like the image-file loaders (RGB, LANCZOS)."""
    config = MiniImageNetConfig(image_size=8, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
    pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8)
    tasks = FewShotTasks(
        pixels.expand(2, 2, 8, 8, 3).contiguous(), 2, 1, 1, mean=config.mean, std=config.std
    )
    expected = tasks._to_inputs(pixels.clone(), torch.Generator())
    assert torch.equal(config.transform(pixels), expected)
    assert torch.equal(config.transform(pixels.numpy()), expected)
    assert torch.equal(normalise(pixels, config.mean, config.std), expected)
    large = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)
    resized = resize_images(large[None], 8)[0]
    assert torch.equal(config.transform(large), normalise(resized, config.mean, config.std))
    image = Image.fromarray(large.numpy())
    lanczos = torch.from_numpy(np.array(image.resize((8, 8), Image.Resampling.LANCZOS)))
    assert torch.equal(config.transform(image), normalise(lanczos, config.mean, config.std))
