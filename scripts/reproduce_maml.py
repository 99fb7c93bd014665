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

Prints a Markdown table: run, command, result (mean ± 95% CI over test tasks), minutes.
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


def describe(results: dict) -> str:
    metrics = results["test"]["metrics"]
    parts = []
    if "accuracy" in metrics:
        m = metrics["accuracy"]
        parts.append(f"accuracy {100 * m['mean']:.1f} ± {100 * m['ci95']:.1f}%")
        if "pre_accuracy" in metrics:
            parts.append(f"(before adaptation {100 * metrics['pre_accuracy']['mean']:.1f}%)")
    else:
        m = metrics["loss"]
        steps = results["test"]["inner_steps"]
        parts.append(f"MSE {m['mean']:.3f} ± {m['ci95']:.3f} after {steps} step(s)")
    for point in results.get("curve") or []:
        if point.get("inner_steps") in (1, 10) and "loss" in point:
            c = point["loss"]
            parts.append(f"{point['inner_steps']} step(s): {c['mean']:.3f} ± {c['ci95']:.3f}")
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/reproduce")
    ap.add_argument("--quick", action="store_true", help="much shorter runs (smoke test)")
    ap.add_argument("--list", action="store_true", help="print the full paper commands too")
    ap.add_argument("--data", default=os.environ.get("METARUN_DATA", "data"))
    ap.add_argument("--only", type=int, nargs="+", help="run only these rows (0 = sinusoid)")
    args = ap.parse_args()
    print("| run | command | result (mean ± 95% CI, 600 test tasks) | minutes |")
    print("|---|---|---|---|")
    for i, (name, overrides) in enumerate(runs(args.data, args.quick)):
        if args.only is not None and i not in args.only:
            continue
        run_dir = Path(args.out) / f"run{i}"
        cmd = [str(BIN / "metarun"), *overrides, f"hydra.run.dir={run_dir}", "log.progress=false"]
        t0 = time.time()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        minutes = (time.time() - t0) / 60
        results = json.loads((run_dir / "results.json").read_text())
        shown = "metarun " + " ".join(o for o in overrides if not o.startswith("dataset.root"))
        print(f"| {name} | `{shown}` | {describe(results)} | {minutes:.1f} |", flush=True)
    if args.list:
        print("\nFull paper runs (GPU recommended, full Omniglot in dataset.root):")
        for name, cmd in PAPER.items():
            print(f"- {name}: `{cmd}`")


if __name__ == "__main__":
    main()
