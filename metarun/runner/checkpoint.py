"""Checkpoints: atomic writes, and every random state needed to resume a run exactly.

A checkpoint is a dict saved with :func:`torch.save`::

    {
        "algorithm": algorithm.state_dict(),   # model's initial weights, learned inner lrs, ...
        "meta_opt": meta_optimizer.state_dict(),
        "step": int,                           # completed outer steps
        "rng": rng_state(task_generator),
        "config": str,                         # resolved YAML (metarun.config.to_yaml)
        "options": {"algo": "maml", ...},      # the chosen option of each config group
        "task_type": "regression" | "classification",
        "best": {"metric": str, "value": float, "step": int} | None,
        "metarun_version": str,
    }

Everything in it is a tensor, number, string or container of those, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is opened).

The trainer keeps the ``last.pt`` it replaces as ``checkpoints.prev/last.pt`` (beside
``checkpoints/``, which holds only what the run wrote last); resuming falls back to it, with a
warning, when ``last.pt`` cannot be read (truncated by a full disk or a partial copy).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the file it replaced:
    ``<run dir>/checkpoints/last.pt`` -> ``<run dir>/checkpoints.prev/last.pt``."""
    path = Path(path)
    return path.parent.with_name(f"{path.parent.name}.prev") / path.name


def save_checkpoint(
    path: str | Path, state: dict[str, Any], *, keep_previous: bool = False
) -> Path:
    """Write ``state`` to ``path`` atomically: a reader (or a crash) never sees half a file.

    The temporary file lives in the same folder, so ``os.replace`` is a rename within one file
    system, which POSIX makes atomic.

    Args:
        keep_previous: keep the file being replaced as :func:`previous_path`, the fallback
            when ``path`` later turns out unreadable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def _keep_previous(path: Path) -> None:
    """``path`` -> ``previous_path(path)``, with ``path`` in place throughout where the file
    system has hard links."""
    previous = previous_path(path)
    previous.parent.mkdir(exist_ok=True)
    link = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        # No hard links here (some network and FUSE file systems): a moment without last.pt,
        # which loading covers by falling back to the previous one.
        os.replace(path, previous)
        return
    os.replace(link, previous)


def load_latest(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path]:
    """:func:`load_checkpoint` of ``path``, or of its :func:`previous_path` (with a warning)
    when ``path`` is unreadable or missing.

    Returns:
        The state and the file it came from.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: no readable checkpoint (the message names both files).
    """
    path = Path(path).expanduser()
    previous = previous_path(path)
    try:
        return load_checkpoint(path, map_location), path
    except (ValueError, FileNotFoundError) as error:
        if not previous.is_file():
            raise
        first = error
    try:
        state = load_checkpoint(previous, map_location)
    except ValueError as error:
        raise ValueError(f"{first}; the previous checkpoint is unreadable too: {error}") from None
    logger.warning(
        "%s; using the previous checkpoint %s (step %s) instead", first, previous, state["step"]
    )
    return state, previous


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a metarun checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / CHECKPOINT_DIR / LAST
        hint = f" (did you mean {str(inside)!r}?)" if inside.is_file() else ""
        raise ValueError(f"{str(path)!r} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist (checkpoints are written to "
            f"<run dir>/{CHECKPOINT_DIR}/{LAST} and {BEST})"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001
        # torch's unpickler fails on a file that is not a checkpoint with whatever error the
        # garbage triggers (UnpicklingError, EOFError, KeyError, RuntimeError, ...).
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{str(path)!r} is not a metarun checkpoint ({type(error).__name__}: {detail})"
        ) from None
    required = {"algorithm", "step", "config", "options"}
    if not isinstance(state, dict) or not required <= set(state):
        raise ValueError(
            f"{str(path)!r} is not a metarun checkpoint (it lacks some of {sorted(required)})"
        )
    return state


def rng_state(tasks: torch.Tensor) -> dict[str, Any]:
    """Every random state a run draws from: torch (CPU and CUDA), Python, NumPy, and ``tasks``,
    the state of the trainer's task generator from which the next meta-batch is drawn."""
    keys: Any
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        # As plain lists: weights_only loading accepts no NumPy arrays.
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "tasks": tasks.clone(),
    }


def restore_rng_state(state: dict[str, Any], task_generator: torch.Generator) -> None:
    """Inverse of :func:`rng_state`. CUDA states are restored only when as many devices exist."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    task_generator.set_state(state["tasks"].cpu())
