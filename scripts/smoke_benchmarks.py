"""CPU-sized smoke runs of the few-shot image benchmark presets on FAKE data (README table).

Builds tiny fake datasets in each real on-disk format (miniImageNet's pickled caches,
torchvision's cifar-100-python/, tieredImageNet's PNG pickles) whose classes are faint colour
patterns under heavy noise, then runs each preset through the CLI with its paper settings except
for the sizes (fewer steps, 28x28 or 32x32 images, fewer test tasks), and prints the test
accuracy (mean +- 95% interval) after 1 step and after all steps beside the paper's figure. The
figures show that each preset runs end to end and learns; they are NOT reproductions of the
papers (no real data here).

    python scripts/smoke_benchmarks.py                 # every row: 25 min on 2 busy cores
    python scripts/smoke_benchmarks.py --steps 2 --only cifarfs_5way_1shot
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metarun.data.cifar_fs import CIFAR_FS_CLASSES  # noqa: E402
from metarun.data.miniimagenet import MINIIMAGENET_CLASSES  # noqa: E402

METARUN = str(Path(sys.executable).parent / "metarun")
SPLITS = ("train", "val", "test")

# (row, overrides choosing the preset or options, paper figure, dataset folder under the root)
ROWS = [
    ("miniimagenet_5way_1shot", ["experiment=miniimagenet_5way_1shot"], "48.70 ± 1.84%", "mini"),
    ("miniimagenet_5way_5shot", ["experiment=miniimagenet_5way_5shot"], "63.11 ± 0.92%", "mini"),
    (
        "miniimagenet_protonets_5way_1shot",
        ["experiment=miniimagenet_protonets_5way_1shot"],
        "49.42 ± 0.78%",
        "mini",
    ),
    (
        "miniimagenet_protonets_5way_5shot",
        ["experiment=miniimagenet_protonets_5way_5shot"],
        "68.20 ± 0.66%",
        "mini",
    ),
    (
        "miniimagenet_anil_5way_1shot",
        ["experiment=miniimagenet_anil_5way_1shot"],
        "46.7 ± 0.4%",
        "mini",
    ),
    ("cifarfs_5way_1shot", ["experiment=cifarfs_5way_1shot"], "58.9 ± 1.9%", "cifar"),
    ("fc100_5way_1shot", ["experiment=fc100_5way_1shot"], "38.1 ± 1.7%", "cifar"),
    ("tieredimagenet maml 5-way 1-shot", ["dataset=tieredimagenet"], "-", "tiered"),
]


def _class_images(
    label: int, count: int, side: int, rng: np.random.Generator, upscale: int = 1
) -> np.ndarray:
    """A class: one faint 4x4 colour pattern under heavy noise, ``(count, S, S, 3)`` with
    ``S = side * upscale`` (each pixel repeated, so that resizing back to ``side`` keeps the
    noise: the runs use 28x28 (ImageNet formats, written at 84x84) or 32x32 (CIFAR))."""
    pattern = np.random.default_rng(1000 + label).integers(0, 256, (4, 4, 3)) - 128
    base = np.kron(128 + 0.3 * pattern, np.ones((side // 4, side // 4, 1)))
    images = np.clip(base[None] + rng.normal(0, 80, (count, side, side, 3)), 0, 255)
    images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return images.astype(np.uint8)


def write_cifar100(root: Path, per_class: int) -> None:
    """cifar-100-python/ as torchvision extracts it (fine names only matter for the splits)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = sorted(n for names in CIFAR_FS_CLASSES.values() for n in names)
    # The superclass of each fine class, as CIFAR-100's meta file orders them.
    coarse_of = {n: i // 5 for i, n in enumerate(_CIFAR100_BY_SUPERCLASS)}
    coarse = [f"super{i}" for i in range(20)]
    rng = np.random.default_rng(0)
    for name, count in (("train", per_class - per_class // 6), ("test", per_class // 6)):
        images = np.concatenate([_class_images(i, count, 32, rng) for i in range(100)])
        labels = np.repeat(np.arange(100), count)
        entry = {
            "data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
            "fine_labels": labels.tolist(),
            "coarse_labels": [coarse_of[fine[i]] for i in labels],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": fine, "coarse_label_names": coarse}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


# CIFAR-100's fine classes grouped by superclass, superclasses in their meta-file order.
_CIFAR100_BY_SUPERCLASS = (
    "beaver dolphin otter seal whale aquarium_fish flatfish ray shark trout orchid poppy rose "
    "sunflower tulip bottle bowl can cup plate apple mushroom orange pear sweet_pepper clock "
    "keyboard lamp telephone television bed chair couch table wardrobe bee beetle butterfly "
    "caterpillar cockroach bear leopard lion tiger wolf bridge castle house road skyscraper "
    "cloud forest mountain plain sea camel cattle chimpanzee elephant kangaroo fox porcupine "
    "possum raccoon skunk crab lobster snail spider worm baby boy girl man woman crocodile "
    "dinosaur lizard snake turtle hamster mouse rabbit shrew squirrel maple_tree oak_tree "
    "palm_tree pine_tree willow_tree bicycle bus motorcycle pickup_truck train lawn_mower rocket "
    "streetcar tank tractor"
).split()


def write_mini(root: Path, per_class: int) -> None:
    """mini-imagenet-cache-{split}.pkl with the real wnids, 84x84."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    label = 0
    for split in SPLITS:
        wnids = MINIIMAGENET_CLASSES[split]
        images = np.concatenate(
            [_class_images(label + i, per_class, 28, rng, 3) for i in range(len(wnids))]
        )
        label += len(wnids)
        class_dict = {
            w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(wnids)
        }
        payload = {"image_data": images, "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(payload, protocol=4))


def write_tiered(root: Path, per_class: int) -> None:
    """{split}_images_png.pkl + {split}_labels.pkl, classes of unequal sizes, 84x84."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(2)
    first = 0
    for split, classes in zip(SPLITS, (20, 8, 8), strict=True):
        sizes = [per_class + int(rng.integers(0, per_class // 2 + 1)) for _ in range(classes)]
        labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
        blobs = []
        for c, n in enumerate(sizes):
            for image in _class_images(first + c, n, 28, rng, 3):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        payload = {
            "label_specific": labels.astype(np.int32),
            "label_specific_str": [f"n{first + c:08d}" for c in range(classes)],
            "label_general": (labels // 4).astype(np.int32),
            "label_general_str": [f"super{i}" for i in range(classes // 4)],
        }
        (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps(blobs, protocol=2))
        (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(payload, protocol=2))
        first += classes


def run(
    row: list[str], data: str, root: Path, work: Path, args: argparse.Namespace
) -> tuple[str, float]:
    run_dir = work / f"run{time.monotonic_ns()}"
    overrides = [
        f"dataset.root={root}",
        f"dataset.cache_dir={work / 'cache'}",
        f"dataset.image_size={32 if data == 'cifar' else 28}",
        f"outer_steps={args.steps}",
        "eval.every=0",
        f"eval.num_tasks={args.tasks}",
        "eval.batch_size=25",
        "save.every=0",
        "log.progress=false",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        *row,  # last: a row's own values (e.g. outer_steps=1) win
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([METARUN, *overrides], capture_output=True, text=True, env=env, cwd=work)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"metarun {' '.join(overrides)} failed:\n{done.stderr}")
    accuracy = json.loads((run_dir / "results.json").read_text())["test"]["metrics"]["accuracy"]
    return f"{100 * accuracy['mean']:.1f} ± {100 * accuracy['ci95']:.1f}%", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="outer steps per run")
    parser.add_argument("--tasks", type=int, default=100, help="test tasks per run")
    parser.add_argument("--per-class", type=int, default=24, help="fake images per class")
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.only or r[0] in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = {"mini": work / "mini", "cifar": work / "cifar", "tiered": work / "tiered"}
        needed = {r[3] for r in rows}
        if "mini" in needed:
            write_mini(roots["mini"], args.per_class)
        if "cifar" in needed:
            write_cifar100(roots["cifar"], args.per_class)
        if "tiered" in needed:
            write_tiered(roots["tiered"], args.per_class)
        print(
            f"FAKE data (faint colour patterns under noise), {args.steps} outer steps, 28x28 "
            f"(ImageNet formats) or 32x32 (CIFAR) images, {args.tasks} test tasks, "
            f"the presets' other settings; chance 20%. Smoke figures, not reproductions."
        )
        print("| benchmark / preset | paper | after 1 step | smoke (fake data) | time (s) |")
        print("|---|---|---|---|---|")
        for name, row, paper, data in rows:
            untrained, _ = run([*row, "outer_steps=1"], data, roots[data], work, args)
            trained, seconds = run(row, data, roots[data], work, args)
            print(f"| {name} | {paper} | {untrained} | {trained} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
