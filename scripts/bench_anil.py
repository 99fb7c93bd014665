#!/usr/bin/env python
"""One outer step of ANIL vs MAML at equal settings: median seconds and the MAML/ANIL ratio.

Setting: Omniglot-shaped 5-way 1-shot tasks of random pixels (28x28; speed depends on shapes,
not pixel values), Conv4 with 64 filters and BatchNorm, 15 queries per class, meta-batch 32,
inner lr 0.4. Both algorithms are built side by side from the same initial weights and timed
in interleaved rounds after one warm-up step each, so a drift of a shared machine hits them
alike; each time is the median of its rounds.

    python scripts/bench_anil.py                     # 1 inner step; both orders, loop and vmap
    python scripts/bench_anil.py --steps 1 5 --meta-batch 8      # quicker on a CPU
    python scripts/bench_anil.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

# scripts/ is on sys.path when a script in it runs: one batch maker for every benchmark.
from bench_batching import make_algo
from bench_unroll import make_batch

from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML


def timed_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def make_step(
    cls: type[MAML], steps: int, first_order: bool, batching: str, device: torch.device, batch
) -> Callable[[], object]:
    """One outer step of ``cls``: the meta-gradient of the batch, and zeroed gradients."""
    algo = make_algo(steps, first_order, device, cls=cls, task_batching=batching)

    def step() -> None:
        algo.zero_grad(set_to_none=True)
        algo.meta_train_step(batch)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--queries", type=int, default=15, help="queries per class")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="inner steps")
    parser.add_argument("--orders", nargs="+", default=["second", "first"])
    parser.add_argument("--batching", nargs="+", default=["loop", "vmap"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.repeats < 1 or args.meta_batch < 1:
        parser.error("--repeats and --meta-batch must be >= 1")
    device = torch.device(args.device)
    batch = make_batch(args.meta_batch, device, args.queries, shots=args.shots)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# ANIL vs MAML, one outer step: Conv4 (64 filters, BN), 5-way {args.shots}-shot, "
        f"{args.queries} queries/class, meta-batch {args.meta_batch}, {name}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} interleaved rounds"
    )
    print("| inner steps | order | task batching | MAML s | ANIL s | MAML / ANIL |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        for order in args.orders:
            for batching in args.batching:
                fns = {
                    cls.__name__: make_step(cls, steps, order == "first", batching, device, batch)
                    for cls in (MAML, ANIL)
                }
                for fn in fns.values():
                    fn()  # warm-up: allocator, kernels, vmap set-up
                times: dict[str, list[float]] = {k: [] for k in fns}
                names = list(fns)
                for r in range(args.repeats):
                    for k in names[r % 2 :] + names[: r % 2]:  # alternate who goes first
                        times[k].append(timed_once(fns[k], device))
                maml, anil = (statistics.median(times[k]) for k in ("MAML", "ANIL"))
                print(
                    f"| {steps} | {order} | {batching} | {maml:.4f} | {anil:.4f} | "
                    f"{maml / anil:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
