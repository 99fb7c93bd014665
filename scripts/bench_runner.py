#!/usr/bin/env python
"""The runner's cost: metarun's outer step against a hand-written loop doing the same work.

For each row, the same process builds metarun's trainer from the CLI's config (Hydra compose,
validate, build, ``Trainer.fit``: task prefetching, metrics, the divergence check, logging,
TensorBoard, the final checkpoint) and a hand-written second-order MAML of the same model, data
sizes and optimizer that samples its tasks in the loop. They run ``--steps`` outer steps each,
alternately, ``--rounds`` times; the ratio of their per-step times is reported per round and as
the median (the runner's cost relative to the work it runs; 1.00 = no overhead).

Rows:
- ``sinusoid``: the default ``metarun`` job (MLP 40-40, meta-batch 25, 10+10 points, 1 inner
  step, Adam); the reference batches tasks with ``torch.func.vmap``, like the runner's choice.
- ``omniglot_q1`` / ``omniglot_q15``: Conv4 with batch norm, 5-way 1-shot with 1 / 15 queries
  per class, meta-batch 32, task loop in both (the CPU's faster mode for 15 queries).
- ``l2rw_mnist``: learning to reweight on class-imbalanced MNIST (LeNet, 100 training and the
  10 clean examples per step, SGD with momentum; the MNIST test file's pool of 758); the
  reference writes the look-ahead step of SGD with momentum by hand.
- ``sinusoid_compiled`` (not run by default: compiling takes a minute on a CPU): the default job
  with ``compile=true`` against the same eager hand-written loop; a ratio below 1 is what
  compilation gains.

    python scripts/bench_runner.py                  # all rows
    python scripts/bench_runner.py --rows sinusoid --profile   # + where the runner's time goes
    python scripts/bench_runner.py --rows sinusoid sinusoid_compiled   # what compile=true gains
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# scripts/ is on sys.path when a script in it runs: one timer for every benchmark.
from bench_batching import timed_once
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from torch.func import functional_call

from metarun.cli import config_dir
from metarun.config import options, to_yaml, validate
from metarun.config.store import register_configs
from metarun.runner.api import _before_training
from metarun.runner.build import build_experiment, build_lr_schedule, build_meta_optimizer
from metarun.runner.logging import RunLogger
from metarun.runner.trainer import Trainer

ROWS: dict[str, list[str]] = {
    "sinusoid": [],
    "omniglot_q1": [
        "dataset=omniglot",
        "dataset.split=random",
        "dataset.k_query=1",
        "algo.task_batching=loop",
    ],
    "omniglot_q15": [
        "dataset=omniglot",
        "dataset.split=random",
        "dataset.k_query=15",
        "algo.task_batching=loop",
    ],
    "l2rw_mnist": [
        "algo=l2rw",
        "dataset=mnist_imbalance",
        "dataset.source_split=test",
        "dataset.n_train=758",
    ],
    "sinusoid_compiled": ["compile=true"],
}
DEFAULT_ROWS = ["sinusoid", "omniglot_q1", "omniglot_q15", "l2rw_mnist"]


def make_trainer(overrides: list[str], run_dir: Path, device: str) -> Trainer:
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*overrides, f"device={device}", "eval.every=0", "save.every=0"],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        config = validate(cfg)
    experiment = build_experiment(config)
    _before_training(experiment)
    meta_optimizer = build_meta_optimizer(
        config.meta_optimizer, experiment.algorithm.meta_parameters()
    )
    experiment.algorithm.attach_optimizer(meta_optimizer)
    logger = RunLogger(run_dir, tensorboard=config.log.tensorboard)
    logger.__enter__()
    return Trainer(
        experiment,
        meta_optimizer,
        logger,
        run_dir,
        config_yaml=to_yaml(config),
        options=options(config),
        lr_schedule=build_lr_schedule(config.meta_optimizer, config.outer_steps),
    )


def runner_steps(trainer: Trainer, steps: int) -> Callable[[], None]:
    def run() -> None:
        trainer.step = 0
        trainer.config.outer_steps = steps
        trainer.fit()

    return run


# ----------------------------------------------------------------------------- hand-written


def reference_sinusoid(trainer: Trainer, steps: int) -> Callable[[], None]:
    """Second-order MAML on sinusoids, tasks batched with vmap, sampled in the loop."""
    torch.manual_seed(0)
    model = type(trainer.algorithm.model)(1, (40, 40), 1).to(trainer.experiment.device)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    device = trainer.experiment.device
    tasks, k, lr = 25, 10, 0.01

    def task_loss(p, sx, sy, qx, qy):  # type: ignore[no-untyped-def]
        def inner(q):  # type: ignore[no-untyped-def]
            return F.mse_loss(functional_call(model, q, (sx,)), sy)

        grads = torch.func.grad(inner)(p)
        fast = {name: p[name] - lr * grads[name] for name in p}
        return F.mse_loss(functional_call(model, fast, (qx,)), qy)

    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    gen = torch.Generator().manual_seed(0)

    def sample() -> tuple[torch.Tensor, ...]:
        amp = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=gen)
        phase = torch.empty(tasks, 1, 1).uniform_(0.0, torch.pi, generator=gen)
        x = torch.empty(tasks, 2 * k, 1).uniform_(-5.0, 5.0, generator=gen)
        y = amp * torch.sin(x - phase)
        x, y = x.to(device), y.to(device)
        return x[:, :k], y[:, :k], x[:, k:], y[:, k:]

    def run() -> None:
        for _ in range(steps):
            loss = batched(params, *sample()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def reference_omniglot(trainer: Trainer, steps: int) -> Callable[[], None]:
    """Second-order MAML with a task loop on the same image pool, tasks drawn in the loop."""
    exp = trainer.experiment
    pool = exp.tasks.train.pool if exp.tasks is not None else None  # type: ignore[union-attr]
    if pool is None:
        raise ValueError("omniglot rows need the training pool")
    torch.manual_seed(0)
    algo = exp.algorithm
    model = type(algo.model)(num_classes=5).to(exp.device)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # batch statistics, as the runner's batch_stats
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = trainer.config
    n_way, shot, query, tasks = 5, 1, cfg.dataset.k_query, cfg.meta_batch_size
    lr, inner_steps = cfg.algo.inner_lr, cfg.algo.inner_steps
    gen = torch.Generator().manual_seed(0)
    names = [n for n, _ in model.named_parameters()]

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(tasks):
                classes = torch.randperm(pool.shape[0], generator=gen)[:n_way]
                idx = torch.randperm(pool.shape[1], generator=gen)[: shot + query]
                x = pool[classes][:, idx].to(exp.device)  # (n_way, shot+query, 1, 28, 28)
                y = torch.arange(n_way, device=exp.device)[:, None].expand(-1, shot + query)
                sx, qx = x[:, :shot].flatten(0, 1), x[:, shot:].flatten(0, 1)
                sy, qy = y[:, :shot].flatten(), y[:, shot:].flatten()
                fast = dict(model.named_parameters())
                for _ in range(inner_steps):
                    loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
                    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                    fast = {n: fast[n] - lr * g for n, g in zip(names, grads)}
                (F.cross_entropy(functional_call(model, fast, (qx,)), qy) / tasks).backward()
            opt.step()

    return run


def reference_l2rw(trainer: Trainer, steps: int) -> Callable[[], None]:
    """L2RW (Ren et al. 2018, Algorithm 1) with the look-ahead step of SGD with momentum
    written out: eps-weighted loss, one differentiable step from detached weights, clean loss,
    weights from its gradient at eps = 0, the weighted step of the real optimizer."""
    exp = trainer.experiment
    data = exp.tasks.train.data  # type: ignore[union-attr]
    device = exp.device
    torch.manual_seed(0)
    model = type(exp.algorithm.model)(num_classes=data.num_classes).to(device)
    cfg = trainer.config
    lr, momentum = cfg.meta_optimizer.lr, cfg.meta_optimizer.momentum
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    names = [n for n, _ in model.named_parameters()]
    batch = cfg.dataset.batch_size
    gen = torch.Generator().manual_seed(0)
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)

    def run() -> None:
        for _ in range(steps):
            idx = torch.randperm(len(data.train_y), generator=gen)[:batch]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            params = [p.detach().requires_grad_() for p in model.parameters()]
            eps = torch.zeros(len(y), device=device, requires_grad=True)
            losses = F.cross_entropy(
                functional_call(model, dict(zip(names, params)), (x,)), y, reduction="none"
            )
            grads = torch.autograd.grad((eps * losses).sum(), params, create_graph=True)
            ahead = {}
            for name, p, g, real in zip(names, params, grads, model.parameters()):
                buf = opt.state.get(real, {}).get("momentum_buffer")
                step = g if buf is None else momentum * buf + g
                ahead[name] = p - lr * step
            clean = F.cross_entropy(functional_call(model, ahead, (val_x,)), val_y)
            (grad_eps,) = torch.autograd.grad(clean, eps)
            w = torch.clamp(-grad_eps, min=0.0)
            total = w.sum()
            w = w / total if total > 0 else torch.zeros_like(w)
            opt.zero_grad(set_to_none=True)
            (w * F.cross_entropy(model(x), y, reduction="none")).sum().backward()
            opt.step()

    return run


REFERENCES = {
    "sinusoid": reference_sinusoid,
    "omniglot_q1": reference_omniglot,
    "omniglot_q15": reference_omniglot,
    "l2rw_mnist": reference_l2rw,
    "sinusoid_compiled": reference_sinusoid,
}


def profile(fn: Callable[[], None], top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS)
    # A timed run is one Trainer.fit: its fixed work (set-up, the final checkpoint) is spread
    # over the run's steps as in a real run (the default job checkpoints every 1000 steps and
    # logs every 100), so a run of the default job's row is 1000 steps.
    ap.add_argument("--steps", type=int, default=1000, help="outer steps per timed run (sinusoid)")
    ap.add_argument(
        "--slow-steps", type=int, default=20, help="outer steps per timed run (Omniglot, L2RW)"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="cProfile one runner run per row")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("METARUN_DATA", str(Path(__file__).resolve().parents[2] / "shared/data"))
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"steps={args.steps} (Omniglot, L2RW: {args.slow_steps}) rounds={args.rounds}"
    )
    print("| row | runner ms/step | hand-written ms/step | ratio (median of rounds) | rounds |")
    print("|---|---|---|---|---|")
    profiles = []
    for row in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(ROWS[row], Path(tmp), args.device)
            device = trainer.experiment.device
            slow = row.startswith(("omniglot", "l2rw"))
            steps = args.slow_steps if slow else args.steps
            ours = runner_steps(trainer, steps)
            ref = REFERENCES[row](trainer, steps)
            ours(), ref()  # warm-up
            t_ours, t_ref, ratios = [], [], []
            for r in range(args.rounds):
                pair = [("ours", ours), ("ref", ref)]
                for name, fn in pair if r % 2 == 0 else pair[::-1]:
                    (t_ours if name == "ours" else t_ref).append(timed_once(fn, device) / steps)
                ratios.append(t_ours[-1] / t_ref[-1])
            print(
                f"| {row} | {statistics.median(t_ours) * 1e3:.2f} | "
                f"{statistics.median(t_ref) * 1e3:.2f} | {statistics.median(ratios):.3f} | "
                f"{', '.join(f'{x:.2f}' for x in ratios)} |",
                flush=True,
            )
            if args.profile:
                profiles.append((row, profile(ours, args.top)))
            trainer.run_logger.__exit__(None, None, None)
    for row, text in profiles:
        print(f"\n## profile of the runner, {row} (cProfile, by own time)\n{text}")


if __name__ == "__main__":
    main()
