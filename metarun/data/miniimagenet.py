"""miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle 2017: 100 ImageNet
classes, 64/16/20 for train/val/test, 600 images each, 84x84 RGB.

No download works for everyone (the usual links sit behind quotas), so the data are read from
the two formats users have, under ``dataset.root`` (or its ``mini-imagenet``/``miniImagenet``
subfolder):

(a) the pickled caches common in the community, ``mini-imagenet-cache-{train,val,test}.pkl``:
    each a dict with ``image_data`` (uint8 ``(N, 84, 84, 3)``) and ``class_dict`` (wnid -> the
    indices of its 600 images);
(b) the split CSVs of Ravi & Larochelle, ``{train,val,test}.csv`` (``filename,label`` rows,
    e.g. ``n0153282900000005.jpg,n01532829``), with the images in ``images/<filename>`` (or
    ``<label>/<filename>``, ``<split>/<label>/<filename>``) in any size (resized to 84x84).

The pickles are preferred when both are there.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from metarun.data.download import find_layout
from metarun.data.download import not_found_message as _not_found
from metarun.data.images import (
    SPLITS,
    ClassPool,
    FewShotImageConfig,
    cached_pools,
    decode_bytes,
    fingerprint,
    image_task_sources,
    load_pickle,
    resize_images,
)
from metarun.data.pickles import text
from metarun.registry import register
from metarun.tasks import TaskSources

logger = logging.getLogger(__name__)

_SUBDIRS = ("", "mini-imagenet", "miniImagenet", "miniimagenet")
PICKLE = "mini-imagenet-cache-{split}.pkl"
SIDE = 84
PER_CLASS = 600
# Ravi & Larochelle 2017, the split CSVs of github.com/twitter/meta-learning-lstm
# (data/miniImagenet/{train,val,test}.csv): ImageNet wnids of each split, sorted.
MINIIMAGENET_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "n01532829", "n01558993", "n01704323", "n01749939", "n01770081", "n01843383",
        "n01910747", "n02074367", "n02089867", "n02091831", "n02101006", "n02105505",
        "n02108089", "n02108551", "n02108915", "n02111277", "n02113712", "n02120079",
        "n02165456", "n02457408", "n02606052", "n02687172", "n02747177", "n02795169",
        "n02823428", "n02966193", "n03017168", "n03047690", "n03062245", "n03207743",
        "n03220513", "n03337140", "n03347037", "n03400231", "n03476684", "n03527444",
        "n03676483", "n03838899", "n03854065", "n03888605", "n03908618", "n03924679",
        "n03998194", "n04067472", "n04243546", "n04251144", "n04258138", "n04275548",
        "n04296562", "n04389033", "n04435653", "n04443257", "n04509417", "n04515003",
        "n04596742", "n04604644", "n04612504", "n06794110", "n07584110", "n07697537",
        "n07747607", "n09246464", "n13054560", "n13133613",
    ),
    "val": (
        "n01855672", "n02091244", "n02114548", "n02138441", "n02174001", "n02950826",
        "n02971356", "n02981792", "n03075370", "n03417042", "n03535780", "n03584254",
        "n03770439", "n03773504", "n03980874", "n09256479",
    ),
    "test": (
        "n01930112", "n01981276", "n02099601", "n02110063", "n02110341", "n02116738",
        "n02129165", "n02219486", "n02443484", "n02871525", "n03127925", "n03146219",
        "n03272010", "n03544143", "n03775546", "n04146614", "n04149813", "n04418357",
        "n04522168", "n07613480",
    ),
}  # fmt: skip

# MetaOptNet's miniImageNet statistics (RGB, of images in [0, 1]).
IMAGENET_MEAN = [0.4721, 0.4533, 0.4100]
IMAGENET_STD = [0.2772, 0.2678, 0.2845]


def _expected(split: str) -> str:
    classes = len(MINIIMAGENET_CLASSES[split])
    images = classes * PER_CLASS
    return (
        f"{PICKLE.format(split=split)} (image_data uint8 ({images}, 84, 84, 3): "
        f"{images * SIDE * SIDE * 3:,} bytes of pixels, so a file a little larger; class_dict "
        f"of {classes} wnids x {PER_CLASS} indices)"
    )


def not_found_message(root: Path) -> str:
    return _not_found(
        "miniImageNet",
        root,
        _SUBDIRS,
        f"either (a) the pickled caches {'; '.join(_expected(s) for s in SPLITS)}, or (b) Ravi & "
        f"Larochelle's train.csv, val.csv and test.csv (38,400/9,600/12,000 rows of "
        f"filename,label, from github.com/twitter/meta-learning-lstm, data/miniImagenet/) with "
        f"the images they name in images/<filename> (or <label>/<filename>). There is no "
        f"download",
        "put either set of files in one of these folders, or set dataset.root=<folder holding "
        "them>. Verify: metarun loads them and checks the shapes, the 600 images per class and "
        "the 64/16/20 classes, and logs the counts it found",
    )


def _find(root: Path) -> tuple[str, Path] | None:
    return find_layout(
        root,
        _SUBDIRS,
        [
            ("pickle", lambda f: all((f / PICKLE.format(split=s)).is_file() for s in SPLITS)),
            ("csv", lambda f: all((f / f"{s}.csv").is_file() for s in SPLITS)),
        ],
    )


def _read_pickle(path: Path, image_size: int) -> ClassPool:
    fix = f"replace {path} with a complete copy ({_expected(path.stem.rsplit('-', 1)[-1])})"
    data = load_pickle(path, fix)
    try:
        data = {text(k): v for k, v in data.items()}
        images = torch.as_tensor(data["image_data"])
        class_dict = {text(k): list(v) for k, v in data["class_dict"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: expected a dict with image_data and class_dict ({type(error).__name__}: "
            f"{error}). Fix: {fix}"
        ) from None
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
        raise ValueError(
            f"{path}: image_data must be uint8 (N, H, W, 3), got {images.dtype} "
            f"{tuple(images.shape)}. Fix: {fix}"
        )
    names = tuple(sorted(class_dict))
    counts = sorted({len(class_dict[n]) for n in names})
    if len(counts) != 1 or counts[0] == 0:
        raise ValueError(
            f"{path}: every class of class_dict needs the same number of images, found "
            f"{counts}. Fix: {fix}"
        )
    index = torch.as_tensor([class_dict[n] for n in names], dtype=torch.long)  # (C, M)
    if int(index.min()) < 0 or int(index.max()) >= images.shape[0]:
        raise ValueError(f"{path}: class_dict indexes images out of range. Fix: {fix}")
    pool = resize_images(images[index.flatten()], image_size)
    return ClassPool(names, pool.view(len(names), -1, image_size, image_size, 3))


def _read_csv(folder: Path, split: str) -> list[tuple[str, str]]:
    path = folder / f"{split}.csv"
    with open(path, newline="") as handle:
        rows = [r for r in csv.reader(handle) if r]
    if rows and rows[0][:2] == ["filename", "label"]:
        rows = rows[1:]
    bad = [r for r in rows if len(r) != 2]
    if bad:
        raise ValueError(
            f"{path}: rows must be filename,label, got {bad[0]}. Fix: use Ravi & Larochelle's "
            f"CSVs (github.com/twitter/meta-learning-lstm, data/miniImagenet/)"
        )
    return [(r[0], r[1]) for r in rows]


def read_image_folder(
    folder: Path, split: str, rows: list[tuple[str, str]], image_size: int
) -> ClassPool:
    """The images a split CSV names, grouped by label (in CSV order within a class)."""
    by_class: dict[str, list[str]] = {}
    for filename, label in rows:
        by_class.setdefault(label, []).append(filename)
    names = tuple(sorted(by_class))
    counts = sorted({len(by_class[n]) for n in names})
    if len(counts) != 1:
        raise ValueError(
            f"{folder / f'{split}.csv'}: every class needs the same number of images, found "
            f"{counts}. Fix: use Ravi & Larochelle's CSVs"
        )
    buffer = bytearray()
    for label in names:
        for filename in by_class[label]:
            candidates = [
                folder / "images" / filename,
                folder / label / filename,
                folder / split / label / filename,
            ]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise FileNotFoundError(
                    f"{folder / f'{split}.csv'} names {filename} (class {label}) but it is in "
                    f"none of {', '.join(str(p) for p in candidates)}. Fix: put the images "
                    f"there (e.g. {folder / 'images'}/), or use the pickled caches"
                )
            buffer += decode_bytes(path.read_bytes(), image_size, str(path))
    images = torch.frombuffer(buffer, dtype=torch.uint8)
    return ClassPool(names, images.view(len(names), counts[0], image_size, image_size, 3).clone())


def check_split(
    pools: dict[str, ClassPool], published: dict[str, tuple[str, ...]], what: str
) -> None:
    """A class in two splits is an error (test classes would be trained on); classes other than
    the published split's are allowed, with a warning."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in pools[split].names:
            if name in seen:
                raise ValueError(
                    f"{what}: class {name} is in both the {seen[name]} and the {split} files, "
                    f"so test classes would be trained on. Fix: use the published split files"
                )
            seen[name] = split
    for split in SPLITS:
        other = sorted(set(pools[split].names) - set(published[split]))
        if other:
            logger.warning(
                "%s: %d %s classes are not in the published %s split (e.g. %s)",
                what,
                len(other),
                split,
                split,
                other[0],
            )


def load_miniimagenet(
    root: str | Path, *, image_size: int = SIDE, cache_dir: str | None = None
) -> dict[str, ClassPool]:
    """The miniImageNet class pools, from the pickles or the image folders.

    Returns:
        ``{"train", "val", "test"}`` -> :class:`ClassPool` ``(C, 600, S, S, 3)`` uint8.

    Raises:
        FileNotFoundError: neither format under ``root`` (the message says what to put where).
        ValueError: damaged or inconsistent files.
    """
    root = Path(root).expanduser()
    found = _find(root)
    if found is None:
        raise FileNotFoundError(not_found_message(root))
    kind, folder = found
    if kind == "pickle":
        files = [folder / PICKLE.format(split=s) for s in SPLITS]

        def decode() -> dict[str, ClassPool]:
            logger.info("reading the miniImageNet pickles in %s", folder)
            return {s: _read_pickle(f, image_size) for s, f in zip(SPLITS, files, strict=True)}

        key = fingerprint(files)
    else:
        rows = {s: _read_csv(folder, s) for s in SPLITS}

        def decode() -> dict[str, ClassPool]:
            logger.info("decoding the miniImageNet images the CSVs in %s name", folder)
            return {s: read_image_folder(folder, s, rows[s], image_size) for s in SPLITS}

        # The images are named by the CSVs; their folder's listing stands for their contents.
        key = (
            fingerprint([folder / f"{s}.csv" for s in SPLITS]) + f"|{sum(map(len, rows.values()))}"
        )
    pools = cached_pools("miniimagenet", f"{kind}|{key}|size{image_size}", cache_dir, decode)
    check_split(pools, MINIIMAGENET_CLASSES, f"miniImageNet in {folder}")
    return pools


@dataclass
class MiniImageNetConfig(FewShotImageConfig):
    """``dataset=miniimagenet``: N-way K-shot miniImageNet, Ravi & Larochelle's 64/16/20 split."""

    root: str = "${oc.env:METARUN_DATA,data}/miniimagenet"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    option: ClassVar[str] = "miniimagenet"


@register("dataset", "miniimagenet", MiniImageNetConfig)
def build_miniimagenet(config: MiniImageNetConfig) -> TaskSources:
    pools = load_miniimagenet(config.root, image_size=config.image_size, cache_dir=config.cache_dir)
    return image_task_sources(config, pools)
