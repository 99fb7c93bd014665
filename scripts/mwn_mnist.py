#!/usr/bin/env python
"""Meta-Weight-Net against plain training (ERM) and L2RW on class-imbalanced MNIST, 4 vs 9.

For each ``pos_ratio`` (fraction of 9s in the training pool) and seed, trains ``algo=erm``,
``algo=l2rw`` and ``algo=mwn`` through the real runner with the same model, optimizer, steps and
data (the settings and run helpers of ``scripts/l2rw_mnist.py``), and writes to ``--out``
(default ``docs/mwn/``):

- ``results.md``: balanced test error (mean ± std over seeds) per ratio and method, and the
  time per step of each method relative to ERM;
- ``weighting_function.png``: the weight MWN's weight net gives each loss at the end of
  training, one curve per run (needs matplotlib: ``pip install -e '.[plot]'``);
- ``results.json``: every run's numbers and MWN's curves.

    python scripts/mwn_mnist.py --steps 400 --seeds 2   # MNIST test file only, ratio 0.995
    python scripts/mwn_mnist.py --ratios 0.9 0.95 0.98 0.99 0.995 --seeds 3

MWN's own settings are ``--mwn`` overrides (default: those of the acceptance test in
tests/test_mwn.py); every run is ``metarun <overrides>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

from metarun.config.store import register_configs

# The L2RW script's settings (data, schedule) and helpers, so both scripts measure the same runs.
_spec = importlib.util.spec_from_file_location(
    "l2rw_mnist", Path(__file__).with_name("l2rw_mnist.py")
)
assert _spec is not None and _spec.loader is not None
l2rw_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(l2rw_mnist)

METHODS = ("erm", "l2rw", "mwn")
LABELS = {"erm": "ERM (plain training)", "l2rw": "L2RW", "mwn": "Meta-Weight-Net"}
# Adam moves the weight net at a steady pace whatever the size of its meta-gradient (which
# scales with the classifier's small learning rate here); the SGD defaults at rates large
# enough to matter in a few hundred steps saturate the sigmoid into a step function.
MWN_DEFAULT = [
    "algo.weight_net_optimizer=adam",
    "algo.weight_net_lr=0.003",
    "algo.weight_net_weight_decay=0",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/mwn"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.995])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--mwn", nargs="*", default=MWN_DEFAULT, help="extra overrides of the algo=mwn runs"
    )
    return parser


def run_one(args: argparse.Namespace, method: str, ratio: float, seed: int, root: Path) -> dict:
    """l2rw_mnist's run, with ``--mwn`` overrides for MWN and its learned weighting curve."""
    out = l2rw_mnist.run_one(
        args, method, ratio, seed, root, extra=list(args.mwn) if method == "mwn" else ()
    )
    curve = root / f"{method}_p{ratio}_s{seed}" / "curves" / "weights_function.csv"
    if curve.is_file():
        rows = [line.split(",") for line in curve.read_text().splitlines()[1:]]
        out["curve"] = [[float(a), float(b)] for a, b in rows]
    return out


mean_std = l2rw_mnist.mean_std


def markdown(runs: list[dict], args: argparse.Namespace, command: str, took: float) -> str:
    methods = [m for m in METHODS if m in args.methods]
    lines = [
        "# Meta-Weight-Net vs L2RW vs plain training on class-imbalanced MNIST (4 vs 9)",
        "",
        f"Balanced test error (1 - accuracy on {args.n_test} test images, half 4s, half 9s), "
        f"mean ± std over {args.seeds} seed(s) (training and data seed).",
        "",
        "| pos_ratio | training 4s / 9s | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for ratio in args.ratios:
        minority, dominant = l2rw_mnist.minority_counts(args.n_train, ratio)
        cells = []
        for m in methods:
            mean, sd = mean_std(
                [r["error"] for r in runs if (r["pos_ratio"], r["method"]) == (ratio, m)]
            )
            cells.append(f"{mean:.3f} ± {sd:.3f}")
        lines.append(f"| {ratio} | {minority} / {dominant} | " + " | ".join(cells) + " |")
    if "erm" in methods:
        lines += ["", "Time per step relative to ERM (same run settings, same machine):"]
        for m in methods:
            if m == "erm":
                continue
            pairs = [
                a["sec_per_step"] / b["sec_per_step"]
                for a in runs
                for b in runs
                if (a["method"], b["method"]) == (m, "erm")
                and (a["pos_ratio"], a["seed"]) == (b["pos_ratio"], b["seed"])
            ]
            ratio_mean, ratio_sd = mean_std(pairs)
            lines.append(f"- {LABELS[m]} / ERM = {ratio_mean:.2f} ± {ratio_sd:.2f}")
    lines += [
        "",
        "![learned weighting function](weighting_function.png)",
        "",
        "## Settings",
        "",
        f"- Data, model, optimizer and schedule of scripts/l2rw_mnist.py: MNIST "
        f"{args.source_split} file, {args.n_train} training images, 10 clean images, LeNet, SGD "
        f"momentum 0.9 lr {args.lr}, batch {args.batch_size}, {args.steps} steps"
        + (f", gradient norm clipped to {args.grad_clip}" if args.grad_clip > 0 else "")
        + "; the test uses the last weights.",
        f"- MWN: weight net 1-100-1 with its own optimizer, overrides "
        f"{' '.join(args.mwn) or '(none)'}; weights normalised over the batch.",
        "- Each run is `metarun <overrides>`; e.g. `metarun "
        + " ".join(next(r for r in reversed(runs) if r["method"] == methods[-1])["overrides"])
        + "`.",
        "",
        f"Generated by `{command}` in {took / 60:.1f} minutes (machine possibly shared: compare "
        "the ratios, not the absolute times).",
        "",
    ]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        if "curve" in run:
            xs, ys = zip(*run["curve"])
            ax.plot(xs, ys, label=f"pos_ratio {run['pos_ratio']}, seed {run['seed']}")
    ax.set_xlabel("training loss (cross-entropy)")
    ax.set_ylabel("weight V(loss) before normalisation")
    ax.set_title("Meta-Weight-Net's learned weighting function, imbalanced MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    raw = list(argv if argv is not None else sys.argv[1:])
    own, rest = build_parser().parse_known_args(raw)
    args = l2rw_mnist.parse_args(rest)
    for key, value in vars(own).items():
        setattr(args, key, value)
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/mwn_mnist.py", *raw])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mwn_mnist_") as tmp:
        runs = l2rw_mnist.run_grid(args, args.methods, Path(tmp), run_one)
    took = time.perf_counter() - start
    l2rw_mnist.save_runs(args.out, command, took, runs)
    text = markdown(runs, args, command, took)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    if any("curve" in r for r in runs):
        plot([r for r in runs if "curve" in r], args.out / "weighting_function.png")
    print(text)


if __name__ == "__main__":
    main()
