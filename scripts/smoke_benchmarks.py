"""CPU-sized smoke runs of the few-shot image benchmark presets on FAKE data (README table).

Builds tiny fake datasets in each real on-disk format (metarun.testing's writers of
miniImageNet's pickled caches, torchvision's cifar-100-python/, tieredImageNet's PNG pickles)
whose classes are faint colour patterns under heavy noise, then runs each preset as a
``metarun -m`` sweep with its paper settings except for the sizes (fewer steps, 28x28 or 32x32
images, fewer test tasks) over ``outer_steps=1,<steps>``, and prints ``metarun-summary``'s table
over every sweep (test accuracy, mean ± 95% interval, after 1 step and after all steps) and the
papers' figures. The figures show that each preset runs end to end and learns; they are NOT
reproductions of the papers (no real data here).

    python scripts/smoke_benchmarks.py                 # every row: 25 min on 2 busy cores
    python scripts/smoke_benchmarks.py --steps 2 --tasks 4 --per-class 12 --only cifarfs_5way_1shot
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metarun.testing import write_cifar, write_miniimagenet, write_tieredimagenet  # noqa: E402

METARUN = str(Path(sys.executable).parent / "metarun")
METARUN_SUMMARY = str(Path(sys.executable).parent / "metarun-summary")

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


def sweep(
    name: str, row: list[str], data: str, root: Path, work: Path, args: argparse.Namespace
) -> bool:
    """``metarun -m`` of one row at 1 step and at ``args.steps`` steps (the untrained and the
    trained column), into ``work/sweeps/<name>``; False where a job failed."""
    overrides = [
        *row,
        f"outer_steps=1,{args.steps}",
        f"dataset.root={root}",
        f"dataset.cache_dir={work / 'cache'}",
        f"dataset.image_size={32 if data == 'cifar' else 28}",
        "eval.every=0",
        f"eval.num_tasks={args.tasks}",
        "eval.batch_size=25",
        "save.every=0",
        "log.progress=false",
        "device=cpu",
        f"hydra.sweep.dir={work / 'sweeps' / name}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [METARUN, "-m", *overrides], capture_output=True, text=True, env=env, cwd=work
    )
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if done.returncode != 0:  # the summary shows which job failed, and why
        print(done.stderr.strip()[-2000:], file=sys.stderr)
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="outer steps per run")
    parser.add_argument("--tasks", type=int, default=100, help="test tasks per run")
    parser.add_argument("--per-class", type=int, default=24, help="fake images per class")
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--out", type=Path, help="data and sweep dirs (default: a temporary dir)")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.only or r[0] in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        roots = {"mini": work / "mini", "cifar": work / "cifar", "tiered": work / "tiered"}
        write_data(roots, {r[3] for r in rows}, args.per_class)
        print(
            f"FAKE data (faint colour patterns under noise), 1 and {args.steps} outer steps, 28x28 "
            f"(ImageNet formats) or 32x32 (CIFAR) images, {args.tasks} test tasks, "
            f"the presets' other settings; chance 20%. Smoke figures, not reproductions.",
            flush=True,
        )
        ok = [sweep(f"{i}_{name.replace(' ', '_')}", row, data, roots[data], work, args)
              for i, (name, row, _, data) in enumerate(rows)]  # fmt: skip
        # One table over every row's sweep: metarun-summary finds the jobs under each.
        summary = subprocess.run([METARUN_SUMMARY, str(work / "sweeps")], env=os.environ)
        print("\nPapers:")
        for name, _, paper, _ in rows:
            print(f"- {name}: {paper}")
    return 0 if all(ok) and summary.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
