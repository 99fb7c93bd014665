"""Background preparation of the next meta-batches, so sampling never stalls the device.

A single producer thread samples ahead (``depth`` batches) with the run's own
``torch.Generator``; batches arrive in exactly the order a synchronous loop would produce them.
For exact resume, :attr:`Prefetcher.generator_state` is the generator state *before* the next
batch the consumer has not taken yet: checkpoint that, not the generator's live state.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from metarun.tasks import TaskBatch

log = logging.getLogger(__name__)

SampleFn = Callable[[int, torch.Generator], TaskBatch]


class Prefetcher:
    """Samples ``batch_size`` tasks ahead of use in a daemon thread.

    Args:
        sample: ``sample(batch_size, generator) -> TaskBatch`` (e.g. ``FewShotTasks.sample``).
        batch_size: tasks per meta-batch.
        generator: the run's task generator (advanced only by this prefetcher while it runs).
        depth: batches kept ready (0 = synchronous, no thread).
        device: move batches there (pinned memory and non-blocking copies on CUDA).
    """

    def __init__(
        self,
        sample: SampleFn,
        batch_size: int,
        generator: torch.Generator,
        *,
        depth: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        self._sample = sample
        self._batch_size = batch_size
        self._gen = generator
        self._device = torch.device(device)
        self._resume_state = generator.get_state()
        self._queue: queue.Queue[tuple[TaskBatch, torch.Tensor] | BaseException] = queue.Queue(
            maxsize=max(depth, 1)
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="metarun-prefetch", daemon=True)
            self._thread.start()

    def _make(self) -> tuple[TaskBatch, torch.Tensor]:
        batch = self._sample(self._batch_size, self._gen)
        state_after = self._gen.get_state()
        if self._device.type == "cuda":
            batch = batch.pin_memory().to(self._device, non_blocking=True)
        elif self._device.type != "cpu":
            batch = batch.to(self._device)
        return batch, state_after

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as exc:  # handed to the consumer, which re-raises it
            self._queue.put(exc)

    def next(self) -> TaskBatch:
        """The next meta-batch (re-raises any error from the producer thread)."""
        if self._thread is None:
            batch, state_after = self._make()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batch, state_after = item
        self._resume_state = state_after
        return batch

    @property
    def resume_state(self) -> torch.Tensor:
        """Generator state from which a new run samples the first batch not yet consumed."""
        return self._resume_state

    def close(self) -> None:
        """Stops the producer thread (batches sampled ahead are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
