"""The one module that draws: matplotlib figures of a run (the regression fit, accuracy against
adaptation steps) and of a sweep (the swept key against the test metric).

matplotlib is an optional extra (``pip install 'metarun[plot]'``): :func:`pyplot` returns
``None`` without it, and callers then warn once and keep their tables (CSV, Markdown, TensorBoard
text). Nothing here imports torch or matplotlib at import time: ``metarun-summary`` stays quick
on a login node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The fix every "matplotlib is missing" warning names.
INSTALL_HINT = "pip install 'metarun[plot]'"


def pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    # Agg: runs write files on machines without a display (clusters, CI).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def missing(what: str) -> str:
    """The warning for ``what`` (e.g. "test figures") not drawn without matplotlib."""
    return f"matplotlib is not installed: {what} not drawn ({INSTALL_HINT})"


def rgba(fig: Any, dpi: int = 100) -> Any:
    """``fig`` rendered once, as a ``(H, W, 4)`` uint8 array (for the run dir's PNG and
    TensorBoard both: drawing costs more than encoding twice), then closed."""
    import numpy as np

    plt = pyplot()
    try:
        fig.set_dpi(dpi)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba()).copy()
    finally:
        plt.close(fig)


def function_fits(panels: Sequence[Any], title: str) -> Any:
    """The MAML paper's Figure 2 view: one panel per task with the true function, the support
    points and the model's prediction after each number of adaptation steps.

    Args:
        panels: :class:`metarun.spec.bases.FunctionFit` s (1-D sequences of floats).
        title: the figure's title.
    """
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True
    )
    for i, (ax, panel) in enumerate(zip(axes[0], panels)):
        ax.plot(panel.x, panel.truth, color="black", lw=1.5, label="true function")
        steps = sorted(panel.predictions)
        colours = plt.get_cmap("viridis")(
            [0.15 + 0.7 * j / max(1, len(steps) - 1) for j in range(len(steps))]
        )
        for colour, k in zip(colours, steps):
            label = "before adaptation" if k == 0 else f"after {k} step{'' if k == 1 else 's'}"
            ax.plot(panel.x, panel.predictions[k], color=colour, lw=1.2, ls="--", label=label)
        ax.scatter(
            panel.support_x,
            panel.support_y,
            color="tab:red",
            marker="^",
            zorder=3,
            label=f"{len(panel.support_x)} support points",
        )
        ax.set_xlabel("x")
        ax.locator_params(nbins=5)  # every tick is an object to lay out: a run pays per tick
        ax.set_title(panel.title, fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("y")
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    # Fixed margins, not tight_layout: it draws the figure once more, and runs pay for it.
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.84, wspace=0.08)
    return fig


def adaptation_curve(curve: Sequence[Mapping[str, Any]], title: str) -> Any:
    """Test metrics against adaptation steps with their 95% confidence bands, one panel per
    metric (accuracy first where there is one).

    Args:
        curve: ``results.json``'s ``curve``: ``[{"inner_steps": k, "<metric>": {"mean",
            "ci95", "n"}, ...}, ...]``.
        title: the figure's title.
    """
    plt = pyplot()
    names = [n for n in ("accuracy", "loss", "return") if any(n in point for point in curve)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [p for p in curve if name in p]
        ks = [p["inner_steps"] for p in points]
        means = [p[name]["mean"] for p in points]
        cis = [p[name]["ci95"] for p in points]
        ax.plot(ks, means, marker="o", ms=3)
        ax.fill_between(
            ks,
            [m - c for m, c in zip(means, cis)],
            [m + c for m, c in zip(means, cis)],
            alpha=0.25,
            label="95% CI",
        )
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(f"test {name}")
        ax.set_xticks(ks if len(ks) <= 12 else ks[:: math.ceil(len(ks) / 12)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n(mean over {curve[0][names[0]]['n']} test tasks)", fontsize=9)
    fig.subplots_adjust(left=0.16 / len(names), right=0.98, bottom=0.15, top=0.82, wspace=0.3)
    return fig


def sweep_plot(
    series: Mapping[str, Sequence[tuple[Any, float, float]]],
    *,
    x_label: str,
    y_label: str,
    title: str,
) -> Any:
    """A metric against a swept key with 95% confidence intervals: one line per series.

    Args:
        series: label -> ``[(x, mean, ci95), ...]``; ``x`` numbers (a numeric axis, logarithmic
            when positive and spanning 100x or more) or strings (categories in order of first
            appearance).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[0] for points in series.values() for p in points]
    numeric = all(isinstance(x, int | float) for x in xs)
    categories = list(dict.fromkeys(str(x) for x in xs))
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0]) if numeric else list(points)
        pos = [p[0] if numeric else categories.index(str(p[0])) for p in points]
        ax.errorbar(
            pos,
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=4,
            label=label or None,
        )
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 100:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if any(series):  # a lone unlabelled series needs no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_png(image: Any, path: Path) -> None:
    """Write an :func:`rgba` image to ``path`` as PNG, atomically (a reader never sees half a
    file)."""
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    matplotlib.image.imsave(tmp, image, format="png")
    tmp.replace(path)
