#!/usr/bin/env python
"""CPU-sized runs of every few-shot algorithm on the Omniglot minimal splits, through the CLI.

Each row is one ``metarun`` command (5-way 1-shot test tasks, Conv4 with 32 filters, the
official minimal background splits with ``dataset.split=random``, 300 test tasks); the table
gives test accuracy (mean ± 95% CI), the steps trained and the wall time. Settings are small so
that the whole table runs in minutes on 2 cores: compare rows with their step counts in mind,
and the paper columns only as the direction the full presets head in.

    python scripts/compare_algorithms.py [--only maml anil] [--data DIR]
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

COMMON = [
    "dataset=omniglot",
    "dataset.split=random",
    "model.hidden=32",
    "eval.every=0",
    "eval.num_tasks=300",
    "eval.batch_size=25",
    "log.progress=false",
    "save.every=0",
    "device=cpu",
]
MAML_LIKE = ["outer_steps=150", "meta_batch_size=8"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "maml": ("Finn et al. 2017: 98.7%", ["algo=maml", *MAML_LIKE]),
    "fomaml": ("Finn et al. 2017: 98.3%", ["algo=fomaml", *MAML_LIKE]),
    "metasgd": ("Li et al. 2017: 99.5%", ["algo=metasgd", *MAML_LIKE]),
    # 5 inner steps (train and test); the two schedules shortened to the 150 steps.
    "mamlpp": (
        "Antoniou et al. 2019: 99.47%",
        [
            "algo=mamlpp",
            "algo.inner_lr=0.1",
            "algo.msl_anneal_steps=50",
            "algo.first_order_until=50",
            *MAML_LIKE,
        ],
    ),
    "anil": ("Raghu et al. 2020 (miniImageNet 5-shot 61.5%)", ["algo=anil", *MAML_LIKE]),
    # Tested without the proximal term (eval_lam=0), as the authors' code tests.
    "imaml": ("Rajeswaran et al. 2019: 99.16%", ["algo=imaml", "algo.eval_lam=0", *MAML_LIKE]),
    "reptile": (
        "Nichol et al. 2018: 95.4% (97.7% transductive)",
        [
            "experiment=omniglot_reptile_5way_1shot",
            "dataset.k_shot=5",
            "dataset.eval_k_query=5",
            "algo.inner_lr=0.005",
            "algo.eval_inner_steps=20",
            "outer_steps=150",
        ],
    ),
    "protonets": (
        "Snell et al. 2017: 98.8%",
        [
            "algo=protonets",
            "dataset.n_way=20",
            "dataset.eval_n_way=5",
            "dataset.k_query=5",
            "model.max_pool=true",
            "meta_batch_size=1",
            "outer_steps=80",
        ],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--data", default=os.environ.get("METARUN_DATA", "data"))
    args = ap.parse_args()
    metarun = [sys.executable, "-m", "metarun.cli"]
    env = {**os.environ, "METARUN_DATA": args.data}
    print("| algo | paper (Omniglot 5-way 1-shot unless noted) | test accuracy | steps | wall s |")
    print("|---|---|---|---|---|")
    for name in args.only:
        paper, overrides = ROWS[name]
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [*metarun, *overrides, *COMMON, f"hydra.run.dir={tmp}/run"]
            # Experiment presets set their own keys; command-line values given after win.
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                print(f"| {name} | {paper} | failed: {done.stderr.strip()[-300:]} | | |")
                continue
            results = json.loads((Path(tmp) / "run" / "results.json").read_text())
        acc = results["test"]["metrics"]["accuracy"]
        steps = results.get("steps", results.get("step", "?"))
        print(
            f"| {name} | {paper} | {acc['mean'] * 100:.1f} ± {acc['ci95'] * 100:.1f}% "
            f"| {steps} | {wall:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
