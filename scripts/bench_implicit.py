#!/usr/bin/env python
"""Peak memory of one task's meta-gradient: unrolled MAML against implicit iMAML, by inner steps.

Unrolled (second-order MAML, ``metarun.algorithms.maml``) keeps every inner step's activations
for the backward pass; implicit (``metarun.algorithms.imaml``: the inner steps without a graph,
then CG on Hessian-vector products at the solution, ``metarun.unroll.implicit``) keeps one
linearisation. The figure is the peak, over the step, of the bytes held by tensors allocated
during it (one task of the meta-batch: both algorithms run tasks one after another, so a
meta-batch's peak is one task's plus the accumulated gradients).

On the CPU the bytes are counted exactly, not sampled: a ``TorchDispatchMode`` sees every
tensor an op returns (torch.func's transforms included) and a finaliser on its storage sees it
freed, so the figure is deterministic and machine-independent. On CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before the step.

Setting: Omniglot-shaped 5-way 1-shot tasks of random pixels (memory depends on shapes only),
15 queries per class, Conv4 with 64 filters and BatchNorm (``--model mlp``: a 784-64-64-5 MLP,
quicker), inner SGD lr 0.1, iMAML with lam 2 and 5 CG steps.

    python scripts/bench_implicit.py                       # 5, 20, 100 inner steps, Conv4
    python scripts/bench_implicit.py --model mlp --steps 2 8
    python scripts/bench_implicit.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch

# bench_unroll: scripts/ is on sys.path when a script in it runs (one batch maker for all).
from bench_unroll import make_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from metarun.algorithms.imaml import IMAML
from metarun.algorithms.maml import MAML
from metarun.models import Conv4

INNER_LR = 0.1
MB = 2**20


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created while active that are still alive, and their
    peak. A storage is counted once however many tensors view it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        # Storages keep their Python object for as long as they live, so this fires at the free.
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    counter = LiveBytes()
    with counter:
        step()
    return counter.peak


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 5),
        )  # fmt: skip
    return Conv4(num_classes=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--model", choices=["conv4", "mlp"], default="conv4")
    parser.add_argument("--queries", type=int, default=15, help="query examples per class")
    parser.add_argument("--cg-steps", type=int, default=5)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = make_batch(1, device, queries=args.queries)
    base = make_model(args.model).to(device)

    print(
        f"# peak memory of one task's meta-gradient, {args.model}, 5-way 1-shot, "
        f"{5 * args.queries} queries, device {device} "
        f"({'counted tensor bytes' if device.type == 'cpu' else 'max_memory_allocated'})"
    )
    print("| inner steps | unrolled MAML (MB) | implicit iMAML (MB) | unrolled / implicit |")
    print("|---|---|---|---|")
    for steps in args.steps:
        maml = MAML(
            copy.deepcopy(base), task_type="classification", inner_lr=INNER_LR,
            inner_steps=steps, eval_inner_steps=steps, task_batching="loop",
        )  # fmt: skip
        imaml = IMAML(
            copy.deepcopy(base), task_type="classification", lam=args.lam, inner_lr=INNER_LR,
            inner_steps=steps, eval_inner_steps=steps, cg_steps=args.cg_steps,
        )  # fmt: skip
        figures = []
        for algo in (maml, imaml):
            algo.pre_adaptation_metrics = False  # as the runner on steps it does not log
            algo.meta_train_step(batch)  # warm-up: lazy initialisations out of the figure
            algo.zero_grad(set_to_none=True)
            figures.append(peak_bytes(lambda a=algo: a.meta_train_step(batch), device) / MB)
        unrolled, implicit = figures
        print(f"| {steps} | {unrolled:.2f} | {implicit:.2f} | {unrolled / implicit:.1f} |")


if __name__ == "__main__":
    main()
