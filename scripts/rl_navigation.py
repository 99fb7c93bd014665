"""MAML-RL on 2D navigation, CPU-sized: MAML against the paper's "pretrained" baseline, 3 seeds.

    python scripts/rl_navigation.py                    # 3 seeds, 40 x 10 tasks x 10 episodes
    python scripts/rl_navigation.py --outer-steps 100 --meta-batch 40 --fast-batch 20  # paper

For each seed it trains ``algo=maml_rl`` on ``dataset=navigation2d`` twice: MAML (one inner
policy-gradient step, Finn et al. 2017) and the "pretrained" baseline (``algo.inner_steps=0``:
one policy trained by TRPO on all tasks without adaptation, then fine-tuned at test time with
the same inner steps). The runs go ``--jobs`` at a time, each a process with one torch thread.
Each trained policy is tested on the same fixed 40 test goals after 0..3 inner steps (Fig. 5's
x axis), under two schedules: the later steps of ``algo.inner_lr_later`` (the preset: halved,
as the paper's evaluation) and every step of ``algo.inner_lr``. Prints the mean return over the
test goals (mean over seeds ± 95% CI over the seeds' means, and the per-seed values), the
minutes each run took and the wall time. Measured: docs/rl.md.
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import metarun
from metarun import registry
from metarun.algorithms.maml_rl import MAMLRL
from metarun.cli import config_dir
from metarun.config import validate
from metarun.config.store import register_configs
from metarun.runner import api
from metarun.runner.evaluate import evaluate_fixed

METHODS = {"maml": ["algo.inner_steps=1"], "pretrained": ["algo.inner_steps=0"]}
#: Test-time schedules, whether every step takes algo.inner_lr: no, the later ones take
#: algo.inner_lr_later (the preset: halved, Finn et al. 2017, App. A.2); or yes.
SCHEDULES = {"inner_lr, then inner_lr_later": False, "inner_lr every step": True}


def train(overrides: list[str], run_dir: Path) -> Path:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        config = validate(cfg)
    api.run(config, run_dir, overrides=overrides)
    return run_dir / "checkpoints" / "last.pt"


def curve(checkpoint: Path, steps: list[int], constant: bool) -> dict[int, float]:
    """Mean return over the run's fixed test goals after each number of inner steps (the steps
    after the first of the run's ``algo.inner_lr_later``, or, ``constant``, of its
    ``algo.inner_lr``)."""
    learner = metarun.load(checkpoint)
    config = learner.config
    if constant:
        algorithm = learner.algorithm
        if not isinstance(algorithm, MAMLRL):
            raise TypeError(f"{checkpoint} holds {type(algorithm).__name__}, not algo=maml_rl")
        algorithm.set_inner_lr_later(None)
    source = registry.build("dataset", config.dataset).test
    out = {}
    for k in steps:
        stats = evaluate_fixed(
            learner.algorithm, source, num_tasks=config.eval.num_tasks,
            batch_size=config.eval.batch_size, seed=config.eval.test_seed,
            device=learner.device, inner_steps=k,
        )  # fmt: skip
        out[k] = stats["post/return"].mean
    return out


def mean_ci(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return f"{mean:.2f} ± {1.96 * std / math.sqrt(n):.2f}"


def one_run(
    seed: int, method: str, args: argparse.Namespace, steps: list[int]
) -> tuple[dict[str, dict[int, float]], float]:
    """Train one (seed, method) run and test it; returns its curve under each of
    :data:`SCHEDULES` and its minutes."""
    torch.set_num_threads(args.threads)
    register_configs()
    overrides = [
        "experiment=navigation2d_maml",
        f"seed={seed}",
        f"outer_steps={args.outer_steps}",
        f"meta_batch_size={args.meta_batch}",
        f"algo.fast_batch_size={args.fast_batch}",
        "eval.every=0",
        "eval.curve_steps=[]",
        "log.progress=false",
        "log.tensorboard=false",
        "device=cpu",
        *METHODS[method],
        *args.set,
    ]
    start = time.perf_counter()
    checkpoint = train(overrides, args.out / f"{method}_seed{seed}")
    result = {name: curve(checkpoint, steps, same) for name, same in SCHEDULES.items()}
    return result, (time.perf_counter() - start) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--outer-steps", type=int, default=40)
    ap.add_argument("--meta-batch", type=int, default=10)
    ap.add_argument("--fast-batch", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("outputs/rl_navigation"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="overrides for every run, e.g. algo.inner_lr_later=0.05",
    )  # fmt: skip
    args = ap.parse_args()
    steps = [0, 1, 2, 3]
    runs = [(seed, method) for seed in args.seeds for method in METHODS]
    start = time.perf_counter()
    # Separate processes: Hydra's global state, and one torch thread each.
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(one_run, seed, method, args, steps) for seed, method in runs]
        done = [future.result() for future in futures]
    rows = [(method, name) for method in METHODS for name in SCHEDULES]
    results: dict[tuple[str, str], list[dict[int, float]]] = {row: [] for row in rows}
    for (seed, method), (result, minutes) in zip(runs, done):
        for name, values in result.items():
            results[method, name].append(values)
            cells = ", ".join(f"{k}: {v:.2f}" for k, v in values.items())
            print(f"seed {seed} {method} ({name}): return after k steps {{{cells}}}")
        print(f"seed {seed} {method}: {minutes:.1f} min")
    wall = (time.perf_counter() - start) / 60
    print()
    print(f"| method | test schedule | {' | '.join(f'{k} steps' for k in steps)} |")
    print(f"|---|---|{'---|' * len(steps)}")
    for (method, name), per_seed in results.items():
        stats = [mean_ci([r[k] for r in per_seed]) for k in steps]
        print(f"| {method} | {name} | {' | '.join(stats)} |")
    extra = f", {' '.join(args.set)}" if args.set else ""
    print(
        f"\nmean return over the test goals, mean over {len(args.seeds)} seeds ± 95% CI over "
        f"seeds; outer_steps={args.outer_steps}, meta_batch_size={args.meta_batch}, "
        f"fast_batch_size={args.fast_batch}{extra}; {wall:.1f} min wall, {args.jobs} at once"
    )


if __name__ == "__main__":
    main()
