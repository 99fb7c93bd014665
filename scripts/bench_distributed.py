#!/usr/bin/env python
"""Meta-iterations per second with 1 and N processes (torchrun; gloo on CPU, NCCL on CUDA).

Runs the real CLI (`metarun` / `torchrun -m metarun.cli`) on Omniglot-shaped work
(MAML, Conv4, 5-way 1-shot, 15 queries, meta-batch 32), or with `--algo l2rw` on the L2RW
MNIST step, and reads `time/sec_per_step` from each run's metrics.jsonl (mean over logged
intervals after the first).

    python scripts/bench_distributed.py --procs 1 2            # CPU (this machine: 2 cores)
    python scripts/bench_distributed.py --algo l2rw --procs 1 2
    python scripts/bench_distributed.py --procs 1 2 4 8 --device cuda

CPU threads are split evenly: with P processes each gets cores // P threads, so the comparison
is the same machine used two ways, not more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workload(args: argparse.Namespace) -> list[str]:
    if args.algo == "l2rw":
        # The paper's MNIST step (LeNet, batches of 100, the whole 10-image clean set; source
        # split test so that the CI data suffices): each process takes half of each batch.
        return [
            "algo=l2rw",
            "dataset=mnist_imbalance",
            f"dataset.root={Path(args.data).parent}",
            "dataset.source_split=test",
            "dataset.n_train=758",
            "dataset.n_val=10",
            "dataset.batch_size=100",
        ]
    return [
        "dataset=omniglot",
        f"dataset.root={args.data}",
        "dataset.split=random",
        f"meta_batch_size={args.meta_batch}",
        f"algo.task_batching={args.batching}",
    ]


def run(procs: int, args: argparse.Namespace, out: Path) -> float:
    overrides = [
        *workload(args),
        f"outer_steps={args.steps}",
        "log.every=5",
        "eval.every=0",
        "eval.num_tasks=32",
        "save.every=0",
        f"device={args.device}",
        f"hydra.run.dir={out}",
    ]
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [str(BIN / "metarun"), *overrides]
    else:
        cmd = [
            str(BIN / "torchrun"),
            f"--nproc_per_node={procs}",
            f"--master_port={free_port()}",
            "-m",
            "metarun.cli",
            *overrides,
        ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["time/sec_per_step"] for r in rows if "time/sec_per_step" in r][1:]
    return statistics.mean(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--batching", default="loop", choices=["loop", "vmap", "auto"])
    ap.add_argument("--algo", default="maml", choices=["maml", "l2rw"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--data", default=str(Path(os.environ.get("METARUN_DATA", "data")) / "omniglot")
    )
    args = ap.parse_args()
    if args.steps < 10:
        # Step times are logged every 5 steps and the first record (warm-up) is left out.
        ap.error(f"--steps must be >= 10, got {args.steps}")
    setting = (
        "L2RW, MNIST, batch 100, clean set 10"
        if args.algo == "l2rw"
        else f"MAML meta_batch={args.meta_batch} task_batching={args.batching}"
    )
    print(f"device={args.device} cores={os.cpu_count()} steps={args.steps} {setting}")
    print("| processes | (meta-)iterations/s | speed-up |")
    print("|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.procs:
            sec = run(p, args, Path(tmp) / f"p{p}")
            base = base or sec
            print(f"| {p} | {1 / sec:.2f} | {base / sec:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
