#!/usr/bin/env python
"""Meta-iterations per second with 1 and N processes (torchrun; gloo on CPU, NCCL on CUDA).

Runs the real CLI (`metarun` / `torchrun -m metarun.cli`) on Omniglot-shaped work
(MAML, Conv4, 5-way 1-shot, 15 queries, meta-batch 32) and reads `time/sec_per_step` from
each run's metrics.jsonl (mean over logged intervals after the first).

    python scripts/bench_distributed.py --procs 1 2            # CPU (this machine: 2 cores)
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


def run(procs: int, args: argparse.Namespace, out: Path) -> float:
    overrides = [
        "dataset=omniglot",
        f"dataset.root={args.data}",
        "dataset.split=random",
        f"outer_steps={args.steps}",
        f"meta_batch_size={args.meta_batch}",
        "log.every=5",
        "eval.every=0",
        "eval.num_tasks=32",
        "save.every=0",
        f"algo.task_batching={args.batching}",
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--data", default=str(Path(os.environ.get("METARUN_DATA", "data")) / "omniglot")
    )
    args = ap.parse_args()
    if args.steps < 10:
        # Step times are logged every 5 steps and the first record (warm-up) is left out.
        ap.error(f"--steps must be >= 10, got {args.steps}")
    print(
        f"device={args.device} cores={os.cpu_count()} meta_batch={args.meta_batch} "
        f"steps={args.steps} task_batching={args.batching}"
    )
    print("| processes | meta-iterations/s | speed-up |")
    print("|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.procs:
            sec = run(p, args, Path(tmp) / f"p{p}")
            base = base or sec
            print(f"| {p} | {1 / sec:.2f} | {base / sec:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
