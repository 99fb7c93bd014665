"""Where scalars go: TensorBoard event files and ``metrics.jsonl`` under the run dir.

This is the one place a :class:`~torch.utils.tensorboard.SummaryWriter` is created.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metarun.plotting import INSTALL_HINT, rgba, save_png
from metarun.plotting import pyplot as _pyplot

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tb"
METRICS_FILE = "metrics.jsonl"
CURVES_DIR = "curves"
FIGURES_DIR = "figures"
# Axis labels of known curve tags (others: x, y).
_CURVE_AXES = {"weights/function": ("loss", "weight")}


class RunLogger:
    """Writes scalars keyed ``split/name`` (``train/meta_loss``, ``val/accuracy``, ...).

    Args:
        run_dir: the run's output folder; TensorBoard files go to ``<run_dir>/tb``.
        tensorboard: also write TensorBoard event files (``metrics.jsonl`` is always written).
        resume_step: when resuming from a checkpoint taken after this many steps: drop what the
            interrupted run logged after it, so curves do not fork.
        active: ``False`` writes nothing (ranks other than 0 of a distributed run).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        active: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self._writer: Any = None
        self.tensorboard_dir = self.run_dir / TENSORBOARD_DIR
        self.metrics_path = self.run_dir / METRICS_FILE
        self._jsonl: Any = None
        self._warned_no_matplotlib = False
        if not active:
            # Ranks other than 0 of a distributed run write nothing.
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_jsonl(self.metrics_path, resume_step)
        self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        if tensorboard:
            # Imported here: tensorboard is slow to import and unused with log.tensorboard=false.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                str(self.tensorboard_dir),
                # TensorBoard hides events of earlier files at steps >= purge_step.
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, step: int, scalars: Mapping[str, float], *, jsonl: bool = True) -> None:
        """Log ``scalars`` at ``step``: one TensorBoard scalar each, and one JSON line in all
        unless ``jsonl=False`` (for series whose x axis is not the outer step)."""
        if not scalars:
            return
        values = {key: float(value) for key, value in scalars.items()}
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if not jsonl or self._jsonl is None:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def log_histograms(self, step: int, values: Mapping[str, Any]) -> None:
        """TensorBoard histograms (e.g. ``weights/examples``: L2RW's last example weights) at
        ``step``; ``values`` maps tags to tensors. Not written to ``metrics.jsonl``."""
        if self._writer is None:
            return
        for key, value in values.items():
            self._writer.add_histogram(key, value.detach().float().cpu(), step)

    def log_curves(self, step: int, curves: Mapping[str, Any]) -> None:
        """Curves ``{tag: (x, y)}`` (1-D tensors of equal length) at ``step``, e.g.
        ``weights/function``: Meta-Weight-Net's weight against loss.

        Each is written to ``<run_dir>/curves/<tag>.csv`` (``/`` in the tag becomes ``_``;
        rewritten at every logged step: the latest curve) and, when matplotlib is installed
        (``pip install 'metarun[plot]'``), plotted as a TensorBoard figure and
        ``<run_dir>/curves/<tag>.png``. Without matplotlib the TensorBoard entry is a text table
        of the curve instead (one warning per run). Not written to ``metrics.jsonl``.
        """
        if not curves or self._jsonl is None:  # nothing, or not the logging process
            return
        folder = self.run_dir / CURVES_DIR
        folder.mkdir(exist_ok=True)
        plt = _pyplot()
        if plt is None and not self._warned_no_matplotlib:
            self._warned_no_matplotlib = True
            logger.warning(
                "matplotlib is not installed: curves (%s) go to TensorBoard as text tables and "
                "to %s as CSV, without PNGs (%s)",
                ", ".join(curves),
                folder,
                INSTALL_HINT,
            )
        for tag, (x, y) in curves.items():
            xs = [float(v) for v in x.detach().reshape(-1).cpu()]
            ys = [float(v) for v in y.detach().reshape(-1).cpu()]
            name = tag.replace("/", "_")
            x_label, y_label = _CURVE_AXES.get(tag, ("x", "y"))
            rows = [f"{x_label},{y_label}"] + [f"{a!r},{b!r}" for a, b in zip(xs, ys)]
            tmp = folder / f"{name}.csv.tmp"
            tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
            tmp.replace(folder / f"{name}.csv")
            if plt is None:
                if self._writer is not None:
                    step_every = max(1, len(xs) // 10)
                    table = [f"| {x_label} | {y_label} |", "|---|---|"] + [
                        f"| {a:.4g} | {b:.4g} |" for a, b in list(zip(xs, ys))[::step_every]
                    ]
                    self._writer.add_text(tag, "\n".join(table), step)
                continue
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot(xs, ys)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.set_title(f"{tag} (step {step})")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=100)
            if self._writer is not None:
                self._writer.add_figure(tag, fig, step)  # closes the figure
            else:
                plt.close(fig)

    @property
    def active(self) -> bool:
        """Whether this logger writes (``False`` on ranks other than 0)."""
        return self._jsonl is not None

    def log_figure(self, name: str, fig: Any, step: int) -> Path | None:
        """A matplotlib figure to ``<run_dir>/figures/<name>.png`` and TensorBoard's image
        ``test_figure/<name>`` at ``step``, rendered once; closes it.

        Returns:
            The PNG's path (None when this logger writes nothing).
        """
        image = rgba(fig)  # (H, W, 4) uint8; closes the figure
        if not self.active:
            return None
        path = self.run_dir / FIGURES_DIR / f"{name}.png"
        save_png(image, path)
        if self._writer is not None:
            self._writer.add_image(f"test_figure/{name}", image[..., :3], step, dataformats="HWC")
        return path

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A TensorBoard text entry (Markdown) at ``step``; nothing elsewhere."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """TensorBoard's HParams view: the flattened config next to the final metrics."""
        if self._writer is None:
            return
        clean = {key: _hparam_value(value) for key, value in hparams.items()}
        # run_name="." keeps the hparams in the run's own folder instead of a timestamped child.
        self._writer.add_hparams(
            clean, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name="."
        )

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_number(value: float) -> float | str:
    # JSON has no NaN or infinity; write them as strings rather than emit invalid JSON.
    return value if math.isfinite(value) else str(value)


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records of steps ``<= last_step`` (rewritten atomically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the previous run was killed
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"algo": {"inner_lr": 0.4}}`` -> ``{"algo.inner_lr": 0.4}`` (for ``add_hparams``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
