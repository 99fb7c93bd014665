#!/usr/bin/env python
"""The divergence check: what it costs per step, and where ``divergence_factor`` sits.

``--part cost``: the per-step check of the trainer (``Trainer._finite``: non-finite values and
the meta-loss against ``divergence_factor`` times the loss before training) against the check it
replaced (a float64 sum of the gradient norm and the losses on the device, one ``.item()``),
both on the metrics and meta-gradient norm of a real step of the default job (MAML on sinusoid,
vmap), timed in interleaved rounds in one process, and against that job's step time.

``--part ratios``: short healthy runs of every preset family whose data are here (sinusoid,
Omniglot minimal splits with ``dataset.split=random``, the MNIST test file) and of each
algorithm's defaults, each printing the largest ``train/meta_loss`` of any step divided by the
loss before training (the quantity ``divergence_factor`` bounds), and diverging runs (huge
step sizes) for comparison.

    python scripts/bench_divergence.py --part cost
    python scripts/bench_divergence.py --part ratios --steps 100 [--only sinusoid mamlpp]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

OMNI = ["dataset=omniglot", "dataset.split=random"]
# After a preset's own keys: narrower convolutions and at most 8 tasks per step, so that the
# table runs on a CPU (smaller meta-batches only make the meta-loss noisier).
SMALL = ["model.hidden=8", "meta_batch_size=8"]
LOOP = "algo.task_batching=loop"  # MAML's family: no start-up measurement
MNIST = ["dataset=mnist_imbalance", "dataset.source_split=test", "dataset.n_train=758"]
# name -> overrides; steps and logging are added. Healthy runs first, then diverging ones.
HEALTHY: dict[str, list[str]] = {
    "sinusoid (default job)": [],
    "sinusoid, meta-batch 1": ["meta_batch_size=1"],
    "experiment=sinusoid": ["experiment=sinusoid"],
    "sinusoid fomaml": ["algo=fomaml"],
    "sinusoid metasgd": ["algo=metasgd"],
    "sinusoid reptile": ["algo=reptile", "meta_batch_size=5"],
    "omniglot maml": [*OMNI, LOOP],
    "omniglot maml, meta-batch 1": [*OMNI, LOOP, "meta_batch_size=1"],
    "omniglot_5way_5shot": ["experiment=omniglot_5way_5shot", "dataset.split=random", LOOP],
    "omniglot_20way_1shot": ["experiment=omniglot_20way_1shot", "dataset.split=random", LOOP],
    "omniglot anil": ["algo=anil", *OMNI, LOOP],
    "omniglot_mamlpp_5way_1shot": [
        "experiment=omniglot_mamlpp_5way_1shot",
        "dataset.split=random",
        "algo.msl_anneal_steps=50",
        "algo.first_order_until=50",
        LOOP,
    ],
    "omniglot_imaml_5way_1shot": ["experiment=omniglot_imaml_5way_1shot", "dataset.split=random"],
    "omniglot_reptile_5way_1shot": [
        "experiment=omniglot_reptile_5way_1shot",
        "dataset.split=random",
        "dataset.k_shot=5",
    ],
    "omniglot_protonets_5way_1shot": [
        "experiment=omniglot_protonets_5way_1shot",
        "dataset.split=random",
        "dataset.n_way=20",
        "dataset.k_query=5",
    ],
    "mnist l2rw": ["algo=l2rw", *MNIST],
    "mnist l2rw, lr 0.03 clip 1": [
        "algo=l2rw",
        *MNIST,
        "meta_optimizer.lr=0.03",
        "grad_clip=1.0",
        "dataset.pos_ratio=0.995",
    ],
    "mnist erm": ["algo=erm", *MNIST],
    "mnist mwn": ["algo=mwn", *MNIST],
}
DIVERGING: dict[str, list[str]] = {
    "omniglot maml, inner_lr=1e6 (issue 24)": [*OMNI, LOOP, "algo.inner_lr=1e6"],
    "omniglot maml, inner_lr=100": [*OMNI, LOOP, "algo.inner_lr=100"],
    "omniglot maml, inner_lr=10": [*OMNI, LOOP, "algo.inner_lr=10"],
    "omniglot maml, meta lr 10": [*OMNI, LOOP, "meta_optimizer.lr=10"],
    "sinusoid maml, inner_lr=1": ["algo.inner_lr=1"],
    "mnist l2rw, lr 10": ["algo=l2rw", *MNIST, "meta_optimizer.lr=10"],
}


# ------------------------------------------------------------------------------------- cost


def part_cost(rounds: int, calls: int) -> None:
    from bench_runner import make_trainer

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(
            ["log.tensorboard=false", "algo.task_batching=vmap"], Path(tmp), "cpu"
        )
        batch = trainer.tasks.train.sample(trainer.config.meta_batch_size, trainer.generator)
        algo = trainer.algorithm

        def step_metrics() -> tuple[dict, torch.Tensor]:
            trainer.meta_optimizer.zero_grad(set_to_none=True)
            metrics = dict(algo.meta_train_step(batch))
            grads = [p.grad for p in algo.meta_parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            return metrics, norm

        metrics, norm = step_metrics()

        def previous_check() -> bool:
            # The check before divergence_factor (Trainer._finite as it was, success path): a
            # float64 sum of the norm and the losses on the device, one .item().
            losses = {
                k: v for k, v in metrics.items() if k.startswith("train/") and k.endswith("loss")
            }
            total = norm.detach().double()
            seen = {id(norm)}
            for value in losses.values():
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    total = total + value.detach()
            finite = math.isfinite(total.item()) and all(
                math.isfinite(v) for v in losses.values() if not isinstance(v, torch.Tensor)
            )
            return finite

        def check_off() -> bool:
            trainer.loss_reference = None
            return trainer._finite(metrics, norm)

        reference = trainer.measure_loss_reference()

        def check_on() -> bool:
            trainer.loss_reference = reference
            return trainer._finite(metrics, norm)

        def one_step() -> None:
            step_metrics()

        candidates = {
            "previous check (sum, .item())": previous_check,
            "check, divergence_factor=null": check_off,
            "check, divergence_factor=100": check_on,
        }
        times: dict[str, list[float]] = {name: [] for name in candidates}
        step_times: list[float] = []
        for _ in range(rounds):
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
            t0 = time.perf_counter()
            for _ in range(5):
                one_step()
            step_times.append((time.perf_counter() - t0) / 5)
        step = statistics.median(step_times)
        base = statistics.median(times["previous check (sum, .item())"])
        print(f"default job (sinusoid, vmap) meta-step without the optimizer: {step * 1e3:.2f} ms")
        # Noise on a shared machine only adds time: the fastest round is the check's own cost,
        # the median what a loaded machine gave.
        fastest = min(times["previous check (sum, .item())"])
        print(
            "| check | us per step: fastest round | / previous | median round | / previous "
            "| median share of the step |"
        )
        print("|---|---|---|---|---|---|")
        for name, values in times.items():
            t, low = statistics.median(values), min(values)
            print(
                f"| {name} | {low * 1e6:.1f} | {low / fastest:.2f} | {t * 1e6:.1f} "
                f"| {t / base:.2f} | {t / step * 100:.2f}% |"
            )


# ----------------------------------------------------------------------------------- ratios


def ratio_of_run(overrides: list[str], steps: int, data: str) -> tuple[str, str]:
    """Runs ``overrides`` through the CLI with the bound measured but out of reach, and returns
    the largest meta-loss over the loss before training, and the time."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "metarun.cli",
            *overrides,
            f"outer_steps={steps}",
            "divergence_factor=1e300",  # measured and checkpointed, never reached
            "log.every=1",
            "log.progress=false",
            "log.tensorboard=false",
            "eval.every=0",
            "eval.num_tasks=2",
            "eval.batch_size=2",
            "save.every=0",
            "device=cpu",
            f"hydra.run.dir={run_dir}",
        ]
        t0 = time.perf_counter()
        done = subprocess.run(
            cmd, env={**os.environ, "METARUN_DATA": data}, capture_output=True, text=True
        )
        wall = f"{time.perf_counter() - t0:.0f}"
        if done.returncode != 0:
            return f"failed: {done.stderr.strip().splitlines()[-1][:200]}", wall
        reference = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)[
            "loss_reference"
        ]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/meta_loss"] for r in rows if "train/meta_loss" in r]
        worst = max(losses)
        first = losses[0]
        return (
            f"{reference:.4g} | {first / reference:.3g} | {worst / reference:.3g} "
            f"(step {losses.index(worst) + 1})",
            wall,
        )


def part_ratios(steps: int, only: list[str] | None, data: str) -> None:
    print(f"{steps} outer steps each; ratio = train/meta_loss / loss before training")
    print("| run | loss before training | ratio at step 1 | largest ratio | wall s |")
    print("|---|---|---|---|---|")
    for kind, rows in (("healthy", HEALTHY), ("diverging", DIVERGING)):
        for name, overrides in rows.items():
            if only and not any(word in name for word in only):
                continue
            if any(o.startswith(("dataset=omniglot", "experiment=omniglot")) for o in overrides):
                keys = {o.split("=")[0] for o in overrides}
                overrides = [*overrides, *[o for o in SMALL if o.split("=")[0] not in keys]]
            result, wall = ratio_of_run(overrides, steps, data)
            print(f"| {kind}: {name} | {result} | {wall} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["cost", "ratios"], default="cost")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", nargs="+", help="rows whose name contains one of these words")
    ap.add_argument("--data", default=os.environ.get("METARUN_DATA", "data"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    if args.part == "cost":
        part_cost(args.rounds, args.calls)
    else:
        part_ratios(args.steps, args.only, args.data)


if __name__ == "__main__":
    main()
