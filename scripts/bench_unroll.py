#!/usr/bin/env python
"""One MAML meta-iteration through metarun's core, a hand-written torch.func reference and
`higher` (when installed): interleaved runs, medians, ratios to the hand-written reference.

Setting (issue 2): Conv4 (64 filters, BatchNorm, 28x28), 5-way 1-shot, 15 queries per class,
meta-batch 32, 1 and 5 inner steps, second and first order.

    python scripts/bench_unroll.py                 # full setting
    python scripts/bench_unroll.py --meta-batch 8 --repeats 3   # quicker

Memory: on CUDA the peak allocated bytes of one iteration; on CPU the bytes of tensors saved for
backward (autograd graph), a proxy since the CPU allocator exposes no peak.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metarun.algorithms.maml import MAML
from metarun.models import Conv4
from metarun.tasks import TaskBatch

try:
    import higher
except ImportError:  # optional comparison
    higher = None


LR = 0.4  # inner learning rate of MAML on Omniglot (Finn et al. 2017)


def make_batch(
    meta_batch: int, device: torch.device, queries: int = 15, shots: int = 1
) -> TaskBatch:
    """Omniglot-shaped 5-way tasks of random pixels (speed and memory depend on shapes only)."""
    g = torch.Generator().manual_seed(0)
    n_way = 5
    return TaskBatch(
        torch.rand(meta_batch, n_way * shots, 1, 28, 28, generator=g),
        torch.arange(n_way).repeat_interleave(shots).expand(meta_batch, -1).clone(),
        torch.rand(meta_batch, n_way * queries, 1, 28, 28, generator=g),
        torch.arange(n_way).repeat_interleave(queries).expand(meta_batch, -1).clone(),
    ).to(device)


def reference_step(model, batch: TaskBatch, lr: float, steps: int, first_order: bool) -> None:
    """Hand-written MAML: functional_call + autograd.grad, BN on batch statistics."""
    n = len(batch)
    for i in range(n):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(model, params, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
        (F.cross_entropy(torch.func.functional_call(model, params, (qx,)), qy) / n).backward()


def higher_step(model, batch: TaskBatch, lr: float, steps: int, first_order: bool) -> None:
    n = len(batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(n):
        sx, sy, qx, qy = (t[i] for t in batch.tensors())
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=False, track_higher_grads=not first_order
        ) as (fm, do):
            for _ in range(steps):
                do.step(F.cross_entropy(fm(sx), sy))
            (F.cross_entropy(fm(qx), qy) / n).backward()


def graph_bytes(fn: Callable[[], None]) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure(fn: Callable[[], None], device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, 0


def impls_for(model, algo, batch, lr, steps, first_order) -> dict[str, Callable[[], None]]:
    impls: dict[str, Callable[[], None]] = {
        "reference": lambda: reference_step(model, batch, lr, steps, first_order),
        "metarun": lambda: algo.meta_train_step(batch),
    }
    if higher is not None:
        impls["higher"] = lambda: higher_step(model, batch, lr, steps, first_order)
    return impls


def bench_setting(batch, device, lr: float, steps: int, first_order: bool, repeats: int) -> None:
    torch.manual_seed(0)
    model = Conv4(num_classes=5).to(device)
    algo = MAML(
        model,
        task_type="classification",
        inner_lr=lr,
        inner_steps=steps,
        eval_inner_steps=steps,
        first_order=first_order,
    )
    algo.pre_adaptation_metrics = False  # measure the meta-gradient, not logging
    impls = impls_for(model, algo, batch, lr, steps, first_order)
    times: dict[str, list[float]] = {k: [] for k in impls}
    mem: dict[str, int] = {}
    for fn in impls.values():  # warm-up
        model.zero_grad(set_to_none=True)
        fn()
    for _ in range(repeats):
        for name, fn in impls.items():  # interleaved
            model.zero_grad(set_to_none=True)
            dt, peak = measure(fn, device)
            times[name].append(dt)
            mem[name] = max(mem.get(name, 0), peak)
    if device.type == "cpu":
        one = impls_for(model, algo, make_batch(1, device), lr, steps, first_order)
        mem = {name: graph_bytes(fn) for name, fn in one.items()}
    ref = statistics.median(times["reference"])
    order = "first" if first_order else "second"
    for name in impls:
        med = statistics.median(times[name])
        print(
            f"{steps:>5} {order:>6} {name:>10} {med:>9.3f} {med / ref:>6.2f} "
            f"{mem[name] / 2**20:>9.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = make_batch(args.meta_batch, device)
    lr = LR
    print(
        f"device={device} threads={torch.get_num_threads()} meta_batch={args.meta_batch} "
        f"repeats={args.repeats} torch={torch.__version__} higher={'yes' if higher else 'no'}"
    )
    header = (
        f"{'steps':>5} {'order':>6} {'impl':>10} {'median s':>9} {'ratio':>6} "
        f"{'graph MiB' if device.type == 'cpu' else 'peak MiB':>9}"
    )
    print(header)
    for steps in args.steps:
        for first_order in (False, True):
            bench_setting(batch, device, lr, steps, first_order, args.repeats)
    print(
        "ratio = median time / hand-written reference (lower is faster). CPU memory column: "
        "bytes saved for backward by ONE task (the loop frees each task's graph before the "
        "next); higher's first order is its track_higher_grads=False, which gives no "
        "meta-gradient at all."
    )


if __name__ == "__main__":
    main()
