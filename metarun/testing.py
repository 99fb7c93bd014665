"""Fake data in the real on-disk formats, for tests and benchmarks.

One writer per format, each writing the files its loader in :mod:`metarun.data` reads, with the
real names, keys, dtypes and layout but a few images per class:

- :func:`write_omniglot`: an Omniglot archive (``images_background.zip`` and the like);
- :func:`write_mnist`: MNIST IDX files (``train-images-idx3-ubyte.gz`` and the like);
- :func:`write_cifar`: CIFAR-10/100's pickled batches (``cifar-10-batches-py/``,
  ``cifar-100-python/``);
- :func:`write_miniimagenet`: the community's ``mini-imagenet-cache-{split}.pkl``;
- :func:`write_tieredimagenet`: Ren et al.'s ``{split}_images_png.pkl`` and
  ``{split}_labels.pkl``;
- :func:`write_fake_data`: all of them under one root, as ``METARUN_DATA`` holds the real ones.

The image writers draw either ``"pattern"`` images (each class a faint colour pattern under heavy
noise, :func:`class_images`: learnable from one example, so short runs show learning) or
``"marked"`` ones (random pixels that carry their class and, for CIFAR, where they came from, so
that tests can check what a loader did with each image).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metarun.data.images import SPLITS
from metarun.data.miniimagenet import MINIIMAGENET_CLASSES
from metarun.data.tiered_classes import SUPERCLASS_OF

__all__ = [
    "CIFAR100_CLASSES",
    "Pixels",
    "cifar_batch",
    "class_images",
    "fingerprints",
    "marked_label",
    "write_cifar",
    "write_fake_data",
    "write_idx",
    "write_miniimagenet",
    "write_mnist",
    "write_omniglot",
    "write_pickle",
    "write_tieredimagenet",
]

Pixels = Literal["pattern", "marked"]

# CIFAR-100's superclasses and their fine classes, as in the dataset's meta file (both name lists
# are alphabetical there, so the label indices follow from the names).
CIFAR100_CLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
_CIFAR100_COARSE = sorted(CIFAR100_CLASSES)
_CIFAR100_FINE = sorted(n for names in CIFAR100_CLASSES.values() for n in names)
_CIFAR100_COARSE_OF = {
    n: _CIFAR100_COARSE.index(c) for c, names in CIFAR100_CLASSES.items() for n in names
}
_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_CIFAR_SIDE = 32
_MNIST_SIDE = 28


# --------------------------------------------------------------------------- shared pieces


def class_images(
    label: int, count: int, side: int, rng: np.random.Generator, upscale: int = 1
) -> np.ndarray:
    """``count`` images of class ``label``: the class's own faint 4x4 colour pattern under heavy
    noise, uint8 ``(count, S, S, 3)`` with ``S = side * upscale``.

    The pattern depends on ``label`` alone, the noise on ``rng``. ``side`` must be a multiple of
    4. With ``upscale > 1`` every pixel is repeated, so that a loader resizing back to ``side``
    keeps the noise (e.g. 84x84 files read at 28x28).
    """
    pattern = np.random.default_rng(1000 + label).integers(0, 256, (4, 4, 3)) - 128
    base = np.kron(128 + 0.3 * pattern, np.ones((side // 4, side // 4, 1)))
    images = np.clip(base[None] + rng.normal(0, 80, (count, side, side, 3)), 0, 255)
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return images.astype(np.uint8)


def write_pickle(path: Path, obj: object, protocol: int = 2) -> None:
    """Pickle ``obj`` to ``path`` (its folder created); protocol 2 as the Python 2-era files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def fingerprints(images: Tensor) -> list[bytes]:
    """One key per image (its bytes), to compare sets of images across loads and pools."""
    return [image.numpy().tobytes() for image in images]


def _png(image: np.ndarray) -> np.ndarray:
    """An RGB image PNG-encoded, as the uint8 array the tieredImageNet pickles hold."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


# --------------------------------------------------------------------------- Omniglot


def _omniglot_png(character: int, alphabet: str, side: int) -> bytes:
    """A 1-bit white image with black (stroke) bars: row 1 as long as ``character``, row 3 as
    long as a code of ``alphabet``'s name, and a dot at the lower left, so that every fake character
    differs and rotations are distinguishable. Omniglot draws black strokes on white."""
    image = Image.new("1", (side, side), 1)
    for col in range(min(character, side)):
        image.putpixel((col, 1), 0)
    for col in range(1 + len(alphabet) % (side - 1)):
        image.putpixel((col, 3), 0)
    image.putpixel((0, side - 2), 0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_omniglot(
    root: Path,
    stem: str,
    alphabets: Mapping[str, int],
    *,
    drawers: int = 3,
    as_zip: bool = True,
    side: int = 12,
) -> dict[str, bytes]:
    """Write the Omniglot archive ``<stem>.zip`` (or its extracted folder ``<stem>/``) under
    ``root`` in the official layout, ``<stem>/<Alphabet>/characterNN/<id>_<drawer>.png``.

    Args:
        root: folder to write into (created).
        stem: the archive's name, e.g. ``"images_background"`` or ``"images_evaluation"``.
        alphabets: alphabet name -> its number of characters.
        drawers: images of each character (20 in the real data); all alike.
        as_zip: a zip archive, else the extracted folder.
        side: side of the square 1-bit images (105 in the real data).

    Returns:
        Each file's name inside the archive -> its PNG bytes.
    """
    files = {}
    for a, (alphabet, count) in enumerate(sorted(alphabets.items())):
        for c in range(1, count + 1):
            for d in range(1, drawers + 1):
                name = f"{stem}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png"
                files[name] = _omniglot_png(c, alphabet, side)
    root.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(root / f"{stem}.zip", "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return files


# --------------------------------------------------------------------------- MNIST


def write_idx(path: Path, array: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    data = header + array.numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist(
    folder: Path, prefix: str, counts: Mapping[int, int], *, marker: int = 1, gz: bool = True
) -> None:
    """Write ``<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte`` (``.gz`` with
    ``gz``) into ``folder``, with ``counts[digit]`` 28x28 images of each digit in an order
    shuffled by ``marker``.

    ``prefix`` is ``"train"`` or ``"t10k"`` (the test split). Image bytes ``[0, 0:3]`` hold
    ``(marker, index // 256, index % 256)``, so every image is unique and traceable to its file,
    and byte ``[1, 0]`` holds ``20 * digit``; the rest is 7.
    """
    labels = torch.cat([torch.full((n,), d, dtype=torch.uint8) for d, n in counts.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(marker))]
    images = torch.full((len(labels), _MNIST_SIDE, _MNIST_SIDE), 7, dtype=torch.uint8)
    index = torch.arange(len(labels))
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = marker, index // 256, index % 256
    images[:, 1, 0] = labels * 20
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


# --------------------------------------------------------------------------- CIFAR-10/100


def _marked_rows(labels: Sequence[int], marker: int) -> np.ndarray:
    n = len(labels)
    data = np.random.default_rng(marker).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0], data[:, 1], data[:, 2] = marker, np.arange(n) // 256, np.arange(n) % 256
    data[:, 3] = labels
    return data


def cifar_batch(labels: Sequence[int], *, marker: int, label_key: str = "labels") -> dict[str, Any]:
    """One pickled batch's dict in the official format, with ``"marked"`` images: random bytes
    but for bytes 0..2 (``(marker, i // 256, i % 256)``, so every image is unique and traceable)
    and byte 3 (the true label, :func:`marked_label`). ``label_key``: ``"labels"`` (CIFAR-10) or
    ``"fine_labels"`` (CIFAR-100)."""
    return _batch(list(labels), _marked_rows(labels, marker), f"batch {marker}", label_key)


def _batch(labels: list[int], data: np.ndarray, name: str, label_key: str) -> dict[str, Any]:
    return {
        "batch_label": name,
        label_key: labels,
        "data": data,
        "filenames": [f"{name.replace(' ', '_')}_{i}.png" for i in range(len(labels))],
    }


def marked_label(images: Tensor) -> Tensor:
    """The true labels that ``"marked"`` CIFAR images carry (byte 3), from the loaded images
    ``(N, 3, 32, 32)`` in ``[0, 1]``."""
    return (images.flatten(1)[:, 3] * 255).round().long()


def write_cifar(
    root: Path,
    classes: int = 100,
    *,
    per_class: int = 12,
    test_per_class: int = 2,
    pixels: Pixels = "pattern",
    shuffle: bool = True,
    seed: int = 0,
) -> Path:
    """Write CIFAR-10 (``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``,
    ``test_batch``, ``batches.meta``) or CIFAR-100 (``cifar-100-python/``: ``train``, ``test``,
    ``meta`` with the real fine and coarse names and labels) under ``root``, as torchvision
    extracts them: pickled dicts with ``data`` uint8 ``(N, 3072)`` channel-major rows.

    Args:
        root: folder to write the dataset's folder into.
        classes: 10 or 100.
        per_class: training images of each class.
        test_per_class: test images of each class.
        pixels: ``"pattern"`` (:func:`class_images`) or ``"marked"`` (:func:`cifar_batch`; the
            markers are the batch numbers 1..5, or 1 for CIFAR-100's ``train``, and 9 for the
            test batch).
        shuffle: mix the classes in each file, as in the official files; else grouped by class.
        seed: seed of the noise (``"pattern"``) and of the order.

    Returns:
        The dataset's folder.
    """
    if classes not in (10, 100):
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    if classes == 10:
        folder, label_key = root / "cifar-10-batches-py", "labels"
        files = {
            "train": [(f"data_batch_{i}", i) for i in range(1, 6)],
            "test": [("test_batch", 9)],
        }
        write_pickle(folder / "batches.meta", {"label_names": list(_CIFAR10_NAMES)})
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        files = {"train": [("train", 1)], "test": [("test", 9)]}
        meta = {"fine_label_names": _CIFAR100_FINE, "coarse_label_names": _CIFAR100_COARSE}
        write_pickle(folder / "meta", meta)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), count)
        rows = np.empty((len(labels), 0), dtype=np.uint8)
        if pixels == "pattern":
            images = np.concatenate(
                [class_images(c, count, _CIFAR_SIDE, rng) for c in range(classes)]
            )
            rows = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
        if shuffle:
            order = rng.permutation(len(labels))
            labels, rows = labels[order], rows[order]
        parts = np.array_split(np.arange(len(labels)), len(files[split]))
        for (name, marker), part in zip(files[split], parts, strict=True):
            batch = (
                _batch(labels[part].tolist(), rows[part], name, label_key)
                if pixels == "pattern"
                else cifar_batch(labels[part].tolist(), marker=marker, label_key=label_key)
            )
            if classes == 100:
                batch["coarse_labels"] = [
                    _CIFAR100_COARSE_OF[_CIFAR100_FINE[c]] for c in labels[part]
                ]
            write_pickle(folder / name, batch)
    return folder


# --------------------------------------------------------------------------- miniImageNet


def write_miniimagenet(
    root: Path,
    *,
    per_class: int = 20,
    classes: Sequence[int] = (64, 16, 20),
    side: int = 84,
    upscale: int = 1,
    shuffle: bool = True,
    seed: int = 1,
) -> dict[str, np.ndarray]:
    """Write ``mini-imagenet-cache-{split}.pkl`` into ``root``: dicts with ``image_data`` uint8
    ``(N, S, S, 3)`` and ``class_dict`` (wnid -> the indices of its images), of
    :func:`class_images` images.

    Args:
        root: folder to write into (created).
        per_class: images of each class (600 in the real data).
        classes: classes of the train, val and test splits: the first of Ravi & Larochelle's
            (64, 16, 20).
        side: side of the class patterns (a multiple of 4); the images are ``side * upscale``
            (84 in the real data).
        upscale: pixel repetition (:func:`class_images`).
        shuffle: mix the classes in ``image_data``; else grouped by class.
        seed: seed of the noise and of the order.

    Returns:
        Each split's images grouped by class (``class_dict``'s order), ``(C * per_class, S, S,
        3)``.
    """
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    rng = np.random.default_rng(seed)
    label = 0
    for split, count in zip(SPLITS, classes, strict=True):
        wnids = MINIIMAGENET_CLASSES[split][:count]
        if len(wnids) < count:
            raise ValueError(f"miniImageNet's {split} split has {len(wnids)} classes, not {count}")
        images = np.concatenate(
            [class_images(label + i, per_class, side, rng, upscale) for i in range(count)]
        )
        label += count
        order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
        position = np.argsort(order)  # where image j of the grouped array went
        class_dict = {
            w: position[i * per_class : (i + 1) * per_class].tolist() for i, w in enumerate(wnids)
        }
        payload = {"image_data": images[order], "class_dict": class_dict}
        write_pickle(root / f"mini-imagenet-cache-{split}.pkl", payload, protocol=4)
        written[split] = images
    return written


# --------------------------------------------------------------------------- tieredImageNet


def write_tieredimagenet(
    root: Path,
    *,
    per_class: int = 20,
    classes: Sequence[int] = (20, 8, 8),
    sizes: Mapping[str, Sequence[int]] | None = None,
    names: Mapping[str, Sequence[str]] | None = None,
    side: int = 84,
    upscale: int = 1,
    pixels: Pixels = "pattern",
    shuffle: bool = True,
    seed: int = 2,
) -> None:
    """Write Ren et al.'s ``{split}_images_png.pkl`` (a list of uint8 arrays of PNG bytes) and
    ``{split}_labels.pkl`` (``label_specific``/``_str``, ``label_general``/``_str``) into
    ``root``, with classes of unequal sizes as in the real data.

    Args:
        root: folder to write into (created).
        per_class: without ``sizes``, each class gets ``per_class`` to ``1.5 * per_class``
            images (drawn with ``seed``).
        classes: classes of the train, val and test splits, without ``sizes`` or ``names``.
        sizes: split -> the images of each of its classes.
        names: split -> its class names (default ``n00000000``, ``n00000001``, ... over the
            splits). Superclasses: a name's published one (:mod:`metarun.data.tiered_classes`),
            else one for every two classes.
        side: image side (``"pattern"``: of the class patterns, a multiple of 4); the images are
            ``side * upscale`` (84 in the real data).
        upscale: pixel repetition (:func:`class_images`).
        pixels: ``"pattern"`` (:func:`class_images`) or ``"marked"`` (random pixels but for
            pixel (0, 0), which holds the class's index over all splits, modulo 256).
        shuffle: mix the classes in each split's files; else grouped by class.
        seed: seed of the class sizes, the pixels and the order.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    full = side * upscale
    first = 0
    for s, split in enumerate(SPLITS):
        if names is not None:
            split_names = list(names[split])
        elif sizes is not None:
            split_names = [f"n{first + c:08d}" for c in range(len(sizes[split]))]
        else:
            split_names = [f"n{first + c:08d}" for c in range(classes[s])]
        if sizes is not None:
            counts = list(sizes[split])
        else:
            counts = [per_class + int(rng.integers(0, per_class // 2 + 1)) for _ in split_names]
        if len(counts) != len(split_names):
            raise ValueError(f"{split}: {len(counts)} class sizes for {len(split_names)} names")
        labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
        if pixels == "pattern":
            images = np.concatenate(
                [class_images(first + c, n, side, rng, upscale) for c, n in enumerate(counts)]
            )
            if shuffle:
                order = rng.permutation(len(labels))
                labels, images = labels[order], images[order]
        else:
            if shuffle:
                labels = labels[rng.permutation(len(labels))]
            images = np.stack(
                [rng.integers(0, 256, (full, full, 3), dtype=np.uint8) for _ in labels]
            )
            images[:, 0, 0] = ((first + labels) % 256)[:, None]
        supers = [SUPERCLASS_OF.get(n, f"super{first + c // 2}") for c, n in enumerate(split_names)]
        general = list(dict.fromkeys(supers))
        payload = {
            "label_specific": labels.astype(np.int32),
            "label_specific_str": split_names,
            "label_general": np.array([general.index(supers[c]) for c in labels], dtype=np.int32),
            "label_general_str": general,
        }
        write_pickle(root / f"{split}_images_png.pkl", [_png(image) for image in images])
        write_pickle(root / f"{split}_labels.pkl", payload)
        first += len(split_names)


# --------------------------------------------------------------------------- everything


def write_image_folder(
    root: Path, classes: int, per_class: int, *, nested: bool = True
) -> list[str]:
    """``classes`` folders of ``per_class`` image files each (``dataset=image_folder``'s and
    torchvision's ``ImageFolder`` layout): a class is a colour under noise; files alternate
    PNG/JPEG, three sizes, colour and grey. ``nested``: classes two levels deep
    (``group<k>/class<c>``). Returns the class names (their paths below ``root``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = ((20, 30), (40, 40), (17, 25))
    names = []
    for c in range(classes):
        name = f"group{c % 3}/class{c:02d}" if nested else f"class{c:02d}"
        folder = root / name
        folder.mkdir(parents=True)
        colour = np.random.default_rng(100 + c).integers(0, 256, 3)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i % 4 == 3:
                image = image.convert("L")
            image.save(folder / f"img{i}{'.png' if i % 2 == 0 else '.jpg'}")
        names.append(name)
    return names


def write_fake_data(root: Path, *, per_class: int = 20, side: int = 12) -> Path:
    """Write every dataset's files under ``root`` where each ``dataset=`` option looks for them
    when ``METARUN_DATA=root``, small enough to write in a few seconds.

    - ``omniglot/``: ``images_background.zip`` (5 alphabets of 10 characters) and
      ``images_evaluation.zip`` (2 of 5), ``per_class`` drawers, ``side`` x ``side``: enough for
      ``dataset.split=random`` or ``lake`` with 5- and 20-way tasks (not ``finn``, which needs all
      1623 characters);
    - ``mnist/raw/``: gzipped train (``5 * per_class`` images of each digit) and test
      (``per_class`` of each) IDX files, for small ``dataset.n_train/n_val/n_test``;
    - ``cifar-10-batches-py/`` and ``cifar-100-python/``: ``per_class`` training and
      ``per_class // 4`` test images of each class, 32x32 as in the format;
    - ``miniimagenet/`` and ``tieredimagenet/``: every miniImageNet class with ``per_class``
      images, 20/8/8 tieredImageNet classes of ``per_class`` to ``1.5 * per_class`` (not the
      published ones: the loader warns so), ``side`` x ``side`` (a multiple of 4);
    - ``images/`` (``dataset=image_folder``) and ``torchvision/`` (``dataset=torchvision``'s
      default ``ImageFolder``): 25 classes of ``per_class`` image files of mixed sizes.

    Returns:
        ``root``.
    """
    background = {f"Background{i}": 10 for i in range(5)}
    evaluation = {f"Evaluation{i}": 5 for i in range(2)}
    for stem, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        write_omniglot(root / "omniglot", stem, alphabets, drawers=per_class, side=side)
    for prefix, count, marker in (("train", 5 * per_class, 1), ("t10k", per_class, 2)):
        write_mnist(root / "mnist" / "raw", prefix, dict.fromkeys(range(10), count), marker=marker)
    for classes in (10, 100):
        write_cifar(root, classes, per_class=per_class, test_per_class=max(1, per_class // 4))
    write_miniimagenet(root / "miniimagenet", per_class=per_class, side=side)
    write_tieredimagenet(root / "tieredimagenet", per_class=per_class, side=side)
    write_image_folder(root / "images", 25, per_class)
    write_image_folder(root / "torchvision", 25, per_class, nested=False)
    return root
