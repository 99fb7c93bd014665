"""Preemption and time limits of jobs started by submitit (``hydra/launcher=slurm`` or
``local``, hydra-submitit-launcher).

Before SLURM preempts a job or its time limit ends, submitit's job signals it (SIGUSR2 unless
``SUBMITIT_PREEMPT_SIGNAL`` says otherwise; ``#SBATCH --signal=USR2@<signal_delay_s>``). Its
handler calls the launcher's ``checkpoint`` (hydra-submitit-launcher resubmits the same job),
requeues the job (``scontrol requeue``) and exits on the spot: mid meta-step, with everything
since the last ``save.every`` lost. :class:`Preemption` puts the trainer in between:

1. During training the signal stops the trainer after the current step, as SIGTERM does, and
   ``last.pt`` is saved (``results.json`` says ``stopped_by: SIGUSR2``).
2. Then submitit's handler runs: the job is requeued and the process exits.
3. The requeued job runs the same overrides in the same run dir, and sweep jobs continue from a
   checkpoint there (:func:`metarun.runner.api.run`, ``auto_resume``): the result is that of an
   uninterrupted run (resume is exact).

Outside training (building, testing) the signal goes to submitit's handler at once: there is
nothing to save beyond what is on disk. SIGTERM keeps its meaning (stop and save, no requeue):
``scancel`` sends it, and a job the user cancels must not come back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from metarun.runner.trainer import StopFlag

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any]


def preemption_signal() -> signal.Signals | None:
    """The signal submitit sends before a preemption or time limit, inside a submitit job
    (``SUBMITIT_EXECUTOR`` set); None elsewhere."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        from submitit import JobEnvironment
    except ImportError:
        return None
    return signal.Signals[f"SIG{JobEnvironment.USR_SIG}"]


class Preemption:
    """Context manager around a run; a no-op outside submitit jobs. After the run, call
    :meth:`requeue_if_stopped` (see the module docstring).

    Example::

        with Preemption() as preemption:
            summary = run(config, run_dir)
        preemption.requeue_if_stopped(summary.stopped_by)  # exits if requeued
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.received = False
        self._submitit_handler: Handler | None = None

    def __enter__(self) -> Preemption:
        sig = preemption_signal()
        if sig is None or threading.current_thread() is not threading.main_thread():
            return self
        handler = signal.getsignal(sig)
        if not callable(handler):  # submitit has not installed its handler: leave things be
            return self
        self.signal, self._submitit_handler = sig, handler
        signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.signal is not None:
            signal.signal(self.signal, self._submitit_handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        stop = signal.getsignal(signal.SIGTERM)
        if callable(stop) and isinstance(getattr(stop, "__self__", None), StopFlag):
            # Training: the trainer's stop flag finishes the step and saves last.pt.
            self.received = True
            stop(signum, frame)  # a StopFlag's bound handler
        else:
            assert self._submitit_handler is not None  # installed together with this handler
            self._submitit_handler(signum, frame)

    def requeue_if_stopped(self, stopped_by: str | None) -> None:
        """If the preemption signal stopped training, hand it to submitit now that the
        checkpoint is saved: it requeues the job and exits (or raises submitit's
        ``UncompletedJobError`` once the job has timed out ``max_num_timeout`` times)."""
        if self.signal is None or not self.received or stopped_by != self.signal.name:
            return
        assert self._submitit_handler is not None
        logger.warning("%s: checkpoint saved, requeueing the job through submitit", stopped_by)
        self._submitit_handler(self.signal, None)
