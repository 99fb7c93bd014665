#!/usr/bin/env python
"""Task batching: meta-iterations per second and peak memory of loop vs vmap (vs higher when
installed) vs what `auto` picks, plus peak memory against inner steps with and without
gradient checkpointing.

Setting (issue 6): Omniglot-shaped 5-way 1-shot tasks (28x28, Conv4 with 64 filters and
BatchNorm), 1 query per class (the paper) and 15 queries per class, meta-batch 32, 1 and 5
inner steps, second and first order. Inputs are random tensors of Omniglot's shape: speed and
memory depend on shapes, not pixel values.

    python scripts/bench_batching.py                      # everything (slow on 2 CPU cores)
    python scripts/bench_batching.py --part checkpoint    # memory vs inner steps only
    python scripts/bench_batching.py --part default       # what a fixed default would cost

``--part default`` (whether ``auto`` belongs in the default): for the runs a default or a preset
starts (the default job, MAML / ANIL / MAML++ on Omniglot; real data, ``dataset.split=random``),
one process builds the runner's algorithm with ``task_batching=loop``, ``vmap`` and ``auto``
(its start-up measurement timed), times loop and full vmap in interleaved rounds on one
meta-batch, and prints each fixed choice's step time over the fastest of the two, ``auto``'s
pick, its start-up in steps, and the whole run's time with each default over the run with
``auto`` (the run's ``outer_steps``, start-up included).

Speed: each table row runs in a fresh process in which loop, full vmap, auto (after its
start-up measurement) and higher are built side by side and timed in interleaved rounds (so a
drift of a shared machine hits them alike); the "auto / faster" column divides the faster of
loop and full vmap by auto's time. Memory, in separate fresh processes (each configuration
alone): CUDA peak allocated bytes; CPU peak resident memory added by one meta-iteration (Linux
high-water mark, with glibc told to return freed memory at once, which slows it too much to
time anything there).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch

# One definition of the higher baseline for both benchmarks (scripts/ is on sys.path when a
# script in it runs).
from bench_unroll import LR, higher, higher_step, make_batch

from metarun.algorithms.autotune import choose_task_batching, cpu_peak_bytes
from metarun.algorithms.maml import MAML
from metarun.models import Conv4


def peak(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return cpu_peak_bytes(fn) or 0


def timed_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Each of ``fns`` timed ``repeats`` times after one warm-up call, in rounds whose order
    rotates, so that a drift of a shared machine hits them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed_once(fns[name], device))
    return times


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    return statistics.median(timed_once(fn, device) for _ in range(repeats))


def make_algo(
    steps: int, first_order: bool, device: torch.device, cls: type[MAML] = MAML, **kw
) -> MAML:
    """``cls`` (MAML or a subclass) on Conv4 from seed 0, as the runner steps it when it does not
    log."""
    torch.manual_seed(0)
    algo = cls(
        Conv4(num_classes=5).to(device),
        task_type="classification",
        inner_lr=LR,
        inner_steps=steps,
        eval_inner_steps=steps,
        first_order=first_order,
        **kw,
    )
    algo.pre_adaptation_metrics = False
    return algo


def build(impl: str, queries: int, steps: int, first_order: bool, args, device: torch.device):
    """The meta-iteration ``impl`` names: loop, vmap, vmap/<chunk>, higher, ckpt_on, ckpt_off."""
    if impl.startswith("ckpt"):
        batch = make_batch(args.ckpt_meta_batch, device, queries, shots=args.ckpt_shots)
        algo = make_algo(steps, False, device, checkpoint_inner=impl == "ckpt_on")
        return partial(algo.meta_train_step, batch)
    batch = make_batch(args.meta_batch, device, queries)
    if impl == "higher":
        model = make_algo(steps, first_order, device).model
        return partial(higher_step, model, batch, LR, steps, first_order)
    mode, _, chunk = impl.partition("/")
    algo = make_algo(
        steps,
        first_order,
        device,
        task_batching=mode,
        task_chunk_size=int(chunk) if chunk else None,
    )
    return partial(algo.meta_train_step, batch)


def row_worker(queries: int, steps: int, first_order: bool, args, device: torch.device) -> dict:
    """Speed of one table row in one process: loop, full vmap, auto (after its start-up
    measurement) and higher built side by side and timed in interleaved rounds, so that a
    drift of the machine hits them alike."""
    fns = {
        impl: build(impl, queries, steps, first_order, args, device) for impl in ("loop", "vmap")
    }
    auto = make_algo(steps, first_order, device)
    batch = make_batch(args.meta_batch, device, queries)
    t0 = time.perf_counter()
    choice = choose_task_batching(
        auto, batch, device, repeats=args.auto_repeats, memory_budget_mb=args.budget_mb
    )
    tune_s = time.perf_counter() - t0
    fns["auto"] = partial(auto.meta_train_step, batch)
    if higher is not None and not first_order:  # higher has no first-order meta-gradient mode
        fns["higher"] = build("higher", queries, steps, first_order, args, device)
    times = interleaved(fns, device, args.repeats)
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "pick": choice.mode if choice.mode == "loop" else f"vmap/{choice.chunk or 'all'}",
        "tune_s": tune_s,
    }


def worker(args, device: torch.device) -> None:
    """One measurement in a fresh process; prints 'RESULT <json>'."""
    impl, queries, steps, order = args.worker
    q, n, first_order = int(queries), int(steps), order == "first"
    if impl == "row":
        logging.basicConfig(level=logging.INFO, format=f"[{queries} {steps} {order}] %(message)s")
        out = row_worker(q, n, first_order, args, device)
    else:
        fn = build(impl, q, n, first_order, args, device)
        fn()  # warm-up
        if args.measure == "memory":
            out = {"mib": peak(fn, device) / 2**20}
        else:
            out = {"seconds": timed(fn, device, args.repeats)}
    print("RESULT " + json.dumps(out))


def run_worker(impl: str, queries: int, steps: int, order: str, args, measure: str) -> dict:
    """Runs a worker in a fresh process and returns its result."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        str(queries),
        str(steps),
        order,
        "--measure",
        measure,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--auto-repeats",
        str(args.auto_repeats),
        "--meta-batch",
        str(args.meta_batch),
        "--ckpt-shots",
        str(args.ckpt_shots),
        "--ckpt-meta-batch",
        str(args.ckpt_meta_batch),
    ]
    if args.budget_mb is not None:
        cmd += ["--budget-mb", str(args.budget_mb)]
    env = dict(os.environ)
    if measure == "memory":
        # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so the
        # resident high-water mark measures live memory rather than allocator caching. It also
        # makes every mid-sized allocation a system call (the loop ran 1.75x slower under it),
        # so nothing is timed in such a process.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    # stderr passes through: auto's measurements are logged there.
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def part_batching(args) -> None:
    print(
        f"\n## loop vs vmap vs auto vs higher: meta-iterations/s, median of {args.repeats} "
        "interleaved rounds (peak MiB)"
    )
    impls = ["loop", "vmap", "auto"] + (["higher"] if higher is not None else [])
    print(
        "| queries/class | inner steps | order | "
        + " | ".join(impls)
        + " | auto picked | auto / faster of loop, vmap | auto start-up s |"
    )
    print("|---" * (6 + len(impls)) + "|")
    for queries in args.queries:
        for steps in args.steps:
            for order in ("second", "first"):
                r = run_worker("row", queries, steps, order, args, "time")
                med = r["median_s"]
                mib = {}
                for impl in med:
                    what = {"auto": r["pick"].replace("/all", "")}.get(impl, impl)
                    if what not in mib:
                        mib[what] = run_worker(what, queries, steps, order, args, "memory")["mib"]
                    mib[impl] = mib[what]
                cells = [f"{1 / med[i]:.2f} ({mib[i]:.0f})" if i in med else "n/a" for i in impls]
                ratio = min(med["loop"], med["vmap"]) / med["auto"]
                print(
                    f"| {queries} | {steps} | {order} | "
                    + " | ".join(cells)
                    + f" | {r['pick']} | {ratio:.3f} | {r['tune_s']:.0f} |",
                    flush=True,
                )


def part_checkpoint(args) -> None:
    print(
        f"\n## peak MiB of one second-order meta-iteration vs inner steps (task loop, 5-way "
        f"{args.ckpt_shots}-shot, {args.ckpt_queries} queries/class, "
        f"meta-batch {args.ckpt_meta_batch})"
    )
    print("| inner steps | plain MiB | checkpointed MiB | plain s | checkpointed s |")
    print("|---|---|---|---|---|")
    for steps in args.ckpt_steps:
        (m0, s0), (m1, s1) = (
            (
                run_worker(impl, args.ckpt_queries, steps, "second", args, "memory")["mib"],
                run_worker(impl, args.ckpt_queries, steps, "second", args, "time")["seconds"],
            )
            for impl in ("ckpt_off", "ckpt_on")
        )
        print(f"| {steps} | {m0:.0f} | {m1:.0f} | {s0:.2f} | {s1:.2f} |", flush=True)


DEFAULT_ROWS: dict[str, list[str]] = {
    "default job (MAML, sinusoid)": [],
    "MAML, Omniglot 5-way 1-shot": ["dataset=omniglot"],
    "experiment=omniglot_20way_1shot": ["experiment=omniglot_20way_1shot"],
    "experiment=omniglot_mamlpp_5way_1shot": ["experiment=omniglot_mamlpp_5way_1shot"],
    "ANIL, Omniglot 5-way 1-shot": ["algo=anil", "dataset=omniglot"],
    "experiment=omniglot_cpu algo=maml": ["experiment=omniglot_cpu", "algo=maml"],
}


def part_default(args) -> None:
    import tempfile

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from metarun.cli import config_dir
    from metarun.config import validate
    from metarun.config.store import register_configs
    from metarun.runner.build import build_experiment

    register_configs()
    cache = tempfile.mkdtemp()
    print(
        f"\n## a fixed default against auto (device={args.device}, threads "
        f"{torch.get_num_threads()}, median of {args.repeats} interleaved rounds)"
    )
    print(
        "| run | loop ms | vmap ms | loop / fastest | vmap / fastest | auto picked | auto ms | "
        "auto start-up s (steps) | run time, default loop / auto | default vmap / auto |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, overrides in DEFAULT_ROWS.items():
        if args.rows and not any(word in name for word in args.rows):
            continue
        if any("omniglot" in o for o in overrides):
            overrides = [*overrides, "dataset.split=random", f"dataset.cache_dir={cache}"]
        algos = {}
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            for mode in ("loop", "vmap", "auto"):
                cfg = compose(
                    "config",
                    overrides=[*overrides, f"algo.task_batching={mode}", f"device={args.device}"],
                    return_hydra_config=True,
                )
                HydraConfig.instance().set_config(cfg)
                config = validate(cfg)
                experiment = build_experiment(config, with_data=mode == "loop")
                if mode == "loop":
                    tasks = experiment.tasks
                    batch = tasks.train.sample(
                        config.meta_batch_size, torch.Generator().manual_seed(0)
                    ).to(device_of(args))
                algos[mode] = experiment.algorithm
        auto = algos.pop("auto")
        t0 = time.perf_counter()
        auto.before_training(partial(lambda b: b, batch), device_of(args))
        startup = time.perf_counter() - t0
        pick = auto.task_batching.value
        pick = pick if pick == "loop" else f"vmap/{auto.task_chunk_size or 'all'}"
        fns = {mode: partial(algo.meta_train_step, batch) for mode, algo in algos.items()}
        fns["auto"] = partial(auto.meta_train_step, batch)
        times = interleaved(fns, device_of(args), args.repeats)
        med = {m: statistics.median(v) for m, v in times.items()}
        fastest = min(med["loop"], med["vmap"])
        steps = config.outer_steps
        with_auto = steps * med["auto"] + startup
        print(
            f"| {name} | {med['loop'] * 1e3:.1f} | {med['vmap'] * 1e3:.1f} "
            f"| {med['loop'] / fastest:.2f} | {med['vmap'] / fastest:.2f} | {pick} "
            f"| {med['auto'] * 1e3:.1f} | {startup:.1f} ({startup / fastest:.0f}) "
            f"| {steps * med['loop'] / with_auto:.2f} | {steps * med['vmap'] / with_auto:.2f} |",
            flush=True,
        )


def device_of(args) -> torch.device:
    return torch.device(args.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "batching", "checkpoint", "default"], default="all")
    ap.add_argument("--rows", nargs="+", help="--part default: rows whose name has one of these")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration")
    ap.add_argument("--auto-repeats", type=int, default=3, help="auto's own rounds (its `repeats`)")
    ap.add_argument("--budget-mb", type=float, default=None)
    ap.add_argument("--ckpt-steps", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--ckpt-queries", type=int, default=15)
    ap.add_argument("--ckpt-meta-batch", type=int, default=1)
    ap.add_argument("--ckpt-shots", type=int, default=20, help="support examples per class")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.worker:
        worker(args, device)
        return
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"meta_batch={args.meta_batch} repeats={args.repeats} "
        f"higher={'yes' if higher else 'no'}"
    )
    if args.part in ("all", "batching"):
        part_batching(args)
    if args.part in ("all", "checkpoint"):
        part_checkpoint(args)
    if args.part == "default":
        part_default(args)


if __name__ == "__main__":
    main()
