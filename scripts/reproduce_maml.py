#!/usr/bin/env python
"""MAML reproduction runs through the real CLI, with their measured results.

    python scripts/reproduce_maml.py          # CPU-sized runs (sinusoid, Omniglot minimal)
    python scripts/reproduce_maml.py --list   # also print the full paper commands (GPU)

Runs here (CPU):
- `experiment=sinusoid`: Finn et al. 2017 Sec. 5.1 (K=10 training, 1 step, lr 0.01, 70000
  steps), evaluated with K=5 points after 1..10 steps; targets: MSE about 0.67 after 1 step and
  0.35 after 10 steps.
- Omniglot 5-way 1-shot on the official *minimal* background splits (the only Omniglot data
  available offline here), `dataset.split=random`, shortened and with a smaller meta-batch.

Each row is a ``metarun -m`` sweep (one job; ``--seeds 0 1 2`` makes it several), and
``metarun-summary`` prints one table over all of them (test metrics, mean ± 95% CI over test
tasks); then the sinusoid's MSE after 1 and 10 adaptation steps from its adaptation curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent

PAPER = {
    "Omniglot 5-way 1-shot (paper 98.7 ± 0.4%)": "metarun experiment=omniglot_5way_1shot",
    "Omniglot 5-way 5-shot (paper 99.9 ± 0.1%)": "metarun experiment=omniglot_5way_5shot",
    "Omniglot 20-way 1-shot (paper 95.8 ± 0.3%)": "metarun experiment=omniglot_20way_1shot",
    "Omniglot 20-way 5-shot (paper 98.9 ± 0.2%)": "metarun experiment=omniglot_20way_5shot",
    "Sinusoid (paper Fig. 2)": "metarun experiment=sinusoid",
}


def runs(data: str, quick: bool) -> list[tuple[str, list[str]]]:
    omniglot_steps = 100 if quick else 400
    return [
        (
            "sinusoid, K=10 train / K=5 test",
            ["experiment=sinusoid"] + (["outer_steps=2000"] if quick else []),
        ),
        (
            "Omniglot 5-way 1-shot, minimal splits (random 70/15/15)",
            [
                "dataset=omniglot",
                f"dataset.root={data}/omniglot",
                "dataset.split=random",
                f"outer_steps={omniglot_steps}",
                "meta_batch_size=16",
                "algo.task_batching=auto",
                "eval.every=200",
                "eval.num_tasks=600",
            ],
        ),
    ]


def curve(results: dict) -> str:
    """The MSE (mean ± 95% CI) after 1 and after 10 adaptation steps, from the test's curve."""
    points = [p for p in results.get("curve") or [] if p.get("inner_steps") in (1, 10)]
    return "; ".join(
        f"{p['inner_steps']} step(s): {p['loss']['mean']:.3f} ± {p['loss']['ci95']:.3f}"
        for p in points
        if "loss" in p
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/reproduce")
    ap.add_argument("--quick", action="store_true", help="much shorter runs (smoke test)")
    ap.add_argument("--list", action="store_true", help="print the full paper commands too")
    ap.add_argument("--data", default=os.environ.get("METARUN_DATA", "data"))
    ap.add_argument("--only", type=int, nargs="+", help="run only these rows (0 = sinusoid)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds a row (a sweep)")
    args = ap.parse_args()
    out = Path(args.out)
    failed = False
    for i, (name, overrides) in enumerate(runs(args.data, args.quick)):
        if args.only is not None and i not in args.only:
            continue
        seeds = ",".join(str(s) for s in args.seeds)
        sweep_dir = out / f"row{i}"
        cmd = [
            str(BIN / "metarun"), "-m", *overrides, f"seed={seeds}", "log.progress=false",
            f"hydra.sweep.dir={sweep_dir}",
        ]  # fmt: skip
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        shown = "metarun " + " ".join(o for o in overrides if not o.startswith("dataset.root"))
        print(f"row{i}: {name}: `{shown}` ({(time.time() - t0) / 60:.1f} min)", flush=True)
        if done.returncode != 0:  # the summary shows which job failed, and why
            failed = True
            print(done.stderr.strip()[-2000:], file=sys.stderr)
        for results_file in sorted(sweep_dir.glob("*/results.json")):
            if points := curve(json.loads(results_file.read_text())):
                print(f"  {results_file.parent.relative_to(out)}: {points}")
    print()
    summary = subprocess.run([str(BIN / "metarun-summary"), str(out)])
    if args.list:
        print("\nFull paper runs (GPU recommended, full Omniglot in dataset.root):")
        for name, cmd in PAPER.items():
            print(f"- {name}: `{cmd}`")
    return 1 if failed or summary.returncode != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
