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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metarun.testing import write_cifar, write_miniimagenet, write_tieredimagenet  # noqa: E402

METARUN = str(Path(sys.executable).parent / "metarun")

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


def write_data(roots: dict[str, Path], needed: set[str], per_class: int) -> None:
    """The fake datasets of the rows, 84x84 for the ImageNet formats (28x28 patterns, each pixel
    repeated: the runs read them at 28x28) and one sixth of CIFAR's images in its test files."""
    # Grouped by class (shuffle=False): the data the README's figures were made with.
    if "mini" in needed:
        write_miniimagenet(roots["mini"], per_class=per_class, side=28, upscale=3, shuffle=False)
    if "cifar" in needed:
        test = per_class // 6
        write_cifar(
            roots["cifar"], 100, per_class=per_class - test, test_per_class=test, shuffle=False
        )
    if "tiered" in needed:
        write_tieredimagenet(
            roots["tiered"], per_class=per_class, side=28, upscale=3, shuffle=False
        )


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
        write_data(roots, {r[3] for r in rows}, args.per_class)
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
