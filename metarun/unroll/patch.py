"""A stateless view of an unmodified ``nn.Module`` with time-indexed fast weights (higher's fmodel).

Unlike ``higher``, nothing is subclassed or copied: every call runs the user's own module through
:func:`torch.func.functional_call` with the fast weights (and buffers) substituted, so forward
hooks, parametrizations, tied weights and RNN flat weights behave as in the plain module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from metarun.unroll.functional import functional_call, get_buffers


class BufferPolicy(str, enum.Enum):
    """What happens to buffers (BatchNorm running statistics) during the inner loop.

    - ``private`` (default): the fast model works on its own copies, taken at creation; the
      original module is never modified. Training-mode forwards update the copies.
    - ``write_back``: forwards read and update the original module's buffers in place, as a
      plain training loop would.
    - ``batch_stats``: normalisation layers always use the statistics of the current batch
      (training and eval mode alike, as in the MAML reference code); running statistics are
      neither read nor written.
    """

    PRIVATE = "private"
    WRITE_BACK = "write_back"
    BATCH_STATS = "batch_stats"


_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


class HistoryError(ValueError):
    """Raised when asking for fast weights at a time the fast model does not hold."""


class FunctionalModule:
    """Fast-weight view of ``module``: ``fmodel(x)`` runs ``module`` with the latest fast weights.

    Created by :func:`monkeypatch` / :func:`innerloop_ctx`; not usually built directly.

    Args:
        module: the user's module (left unmodified).
        params: time-0 fast weights, in ``module.parameters()`` order; ``None`` for a stateless
            view (:func:`make_functional`) whose first call must pass ``params=``.
        track_higher_grads: ``False`` keeps only the initial and latest weights (test mode).
        buffer_policy: see :class:`BufferPolicy`.
        device: where copies of buffers live.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor] | None,
        *,
        track_higher_grads: bool = True,
        buffer_policy: BufferPolicy | str = BufferPolicy.PRIVATE,
        device: torch.device | str | None = None,
    ) -> None:
        self.module = module
        self.param_names: list[str] = [n for n, _ in module.named_parameters()]
        if params is not None and len(params) != len(self.param_names):
            raise ValueError(
                f"expected {len(self.param_names)} fast weights (one per module parameter), "
                f"got {len(params)}"
            )
        self.buffer_policy = BufferPolicy(buffer_policy)
        self._track_higher_grads = track_higher_grads
        self._training: bool | None = None
        self._fast_params: list[list[Tensor] | None] = []
        self._buffers: dict[str, Tensor] = (
            {}
            if self.buffer_policy is BufferPolicy.WRITE_BACK
            else get_buffers(module, copy=True, device=device)
        )
        self._buffer_history: list[dict[str, Tensor] | None] = []
        if params is not None:
            self._fast_params.append(list(params))
            self._buffer_history.append(self._snapshot_buffers())

    # -- fast weights ------------------------------------------------------------------------
    @property
    def track_higher_grads(self) -> bool:
        return self._track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {type(value).__name__}")
        self._track_higher_grads = value

    @property
    def fast_params(self) -> list[Tensor]:
        """The latest fast weights, in ``module.parameters()`` order."""
        # Read on every forward: index directly, and let _get explain an empty history.
        latest = self._fast_params[-1] if self._fast_params else None
        return self._get(None) if latest is None else latest

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[Tensor]:
        return self._get(0)

    @property
    def time(self) -> int:
        """Number of updates so far (the index of the latest fast weights)."""
        return len(self._fast_params) - 1

    def update_params(self, params: Iterable[Tensor] | Mapping[str, Tensor]) -> None:
        """Appends new fast weights (a list in parameter order, or a dict by name)."""
        if isinstance(params, Mapping):
            params = [params[n] for n in self.param_names]
        params = list(params)
        if len(params) != len(self.param_names):
            raise ValueError(f"expected {len(self.param_names)} fast weights, got {len(params)}")
        if not self._track_higher_grads and len(self._fast_params) > 1:
            # Test mode keeps time 0 and the latest only: nothing needs the rest.
            self._fast_params[-1] = None
            self._buffer_history[-1] = None
        self._fast_params.append(params)
        self._buffer_history.append(self._snapshot_buffers())

    def _get(self, time: int | None) -> list[Tensor]:
        n = len(self._fast_params)
        if n == 0:
            raise HistoryError(
                "this fast model has no fast weights yet (made by make_functional): call it "
                "with params=[...] (module.parameters() order) or set fmodel.fast_params first"
            )
        t = n - 1 if time is None else time
        if t < 0:
            t += n
        if not 0 <= t < n:
            raise HistoryError(
                f"time={time} is out of range: this fast model holds times 0..{n - 1} "
                f"({n - 1} update(s) so far); use time=None for the latest"
            )
        params = self._fast_params[t]
        if params is None:
            if not self._track_higher_grads:
                raise HistoryError(
                    f"time={time} is not available: with track_higher_grads=False only time=0 "
                    "and the latest fast weights (time=None) are kept; pass "
                    "track_higher_grads=True to keep the history"
                )
            raise HistoryError(
                f"time={time} was dropped by drop_history(); only times "
                f"{[i for i, p in enumerate(self._fast_params) if p is not None]} remain"
            )
        return params

    def parameters(self, time: int | None = None) -> Iterator[Tensor]:
        """Fast weights at ``time`` (``0`` = initial, ``None``/``-1`` = latest)."""
        return iter(self._get(time))

    def named_parameters(self, time: int | None = None) -> Iterator[tuple[str, Tensor]]:
        return zip(self.param_names, self._get(time))

    def params_dict(self, time: int | None = None) -> dict[str, Tensor]:
        """Fast weights at ``time`` keyed by parameter name (the functional layer's format)."""
        return dict(zip(self.param_names, self._get(time)))

    def drop_history(self, keep_last: int = 1, keep_initial: bool = True) -> None:
        """Releases older fast weights (and the graphs only they hold).

        Args:
            keep_last: how many of the latest time steps to keep (>= 1).
            keep_initial: keep time 0 (needed for meta-gradients w.r.t. it).
        """
        if keep_last < 1:
            raise ValueError(f"drop_history: keep_last must be >= 1, got {keep_last}")
        last = len(self._fast_params) - keep_last
        for t in range(1 if keep_initial else 0, max(last, 0)):
            self._fast_params[t] = None
            self._buffer_history[t] = None

    # -- buffers -----------------------------------------------------------------------------
    def _snapshot_buffers(self) -> dict[str, Tensor]:
        if self.buffer_policy is BufferPolicy.WRITE_BACK:
            return {n: b.detach().clone() for n, b in self.module.named_buffers()}
        # Private buffers are replaced (never mutated) on each forward, so a reference suffices.
        return self._buffers

    def buffers(self, time: int | None = None) -> dict[str, Tensor]:
        """Buffers as they were when the fast weights of ``time`` became current;
        ``time=None`` gives the live values."""
        if time is None:
            if self.buffer_policy is BufferPolicy.WRITE_BACK:
                return dict(self.module.named_buffers())
            return dict(self._buffers)
        self._get(time)  # same range and availability errors as the weights
        t = time if time >= 0 else len(self._buffer_history) + time
        snap = self._buffer_history[t]
        assert snap is not None
        return dict(snap)

    # -- module-like behaviour ---------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self.module.training if self._training is None else self._training

    def train(self, mode: bool = True) -> FunctionalModule:
        """Sets the fast model's mode without changing the original module's."""
        self._training = mode
        return self

    def eval(self) -> FunctionalModule:
        return self.train(False)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally: expose the module's submodules and
        # attributes (e.g. fmodel.classifier) read-only, as higher's patched copy does.
        if name.startswith("_") or name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        policy = self.buffer_policy.value
        return f"FunctionalModule(time={self.time}, buffers={policy}, {self.module!r})"

    @contextmanager
    def _mode(self) -> Iterator[None]:
        want = self.training
        force_norm = self.buffer_policy is BufferPolicy.BATCH_STATS
        changed: list[tuple[nn.Module, bool]] = []
        if want != self.module.training or force_norm:
            for m in self.module.modules():
                target = True if force_norm and isinstance(m, _NORM_TYPES) else want
                if m.training != target:
                    changed.append((m, m.training))
                    m.training = target
        try:
            yield
        finally:
            for m, mode in changed:
                m.training = mode

    def __call__(self, *args: Any, params: Any = None, **kwargs: Any) -> Any:
        """Runs the module with the latest fast weights; ``params=`` first makes the given
        weights (list in parameter order, or dict by name) the latest, as higher does."""
        if params is not None:
            self.update_params(params)
        weights = dict(zip(self.param_names, self.fast_params))
        with self._mode():
            if self.buffer_policy is BufferPolicy.WRITE_BACK:
                return functional_call(self.module, weights, *args, **kwargs)
            # Fresh copies each call: running-stat updates land in new tensors, so buffers
            # saved for an earlier backward or held in the history are never mutated.
            scratch = {n: b.clone() for n, b in self._buffers.items()}
            out = functional_call(self.module, weights, *args, buffers=scratch, **kwargs)
            if self.buffer_policy is BufferPolicy.PRIVATE:
                self._buffers = scratch
            return out

    forward = __call__


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    buffer_policy: BufferPolicy | str = BufferPolicy.PRIVATE,
) -> FunctionalModule:
    """A fast-weight view of ``module`` (higher's ``monkeypatch``, without any patching).

    Args:
        module: the user's ``nn.Module``; never modified (unless ``buffer_policy="write_back"``).
        device: move fast weights and buffer copies there.
        copy_initial_weights: ``True``: time-0 fast weights are ``clone().detach()`` copies that
            require grad (frozen parameters stay frozen): no gradient reaches ``module``; take
            meta-gradients w.r.t. ``fmodel.parameters(time=0)``. ``False``: they are
            ``clone()`` s of the module's parameters, so ``meta_loss.backward()`` fills
            ``module``'s ``.grad`` (MAML).
        track_higher_grads: ``False`` for test mode (no graph, history not kept).
        buffer_policy: see :class:`BufferPolicy`.
    """
    params: list[Tensor] = []
    for p in module.parameters():
        if copy_initial_weights:
            q = p.detach().clone()
            q = q if device is None else q.to(device)
            q.requires_grad_(p.requires_grad)
        else:
            q = p.clone() if device is None else p.clone().to(device)
        params.append(q)
    return FunctionalModule(
        module,
        params,
        track_higher_grads=track_higher_grads,
        buffer_policy=buffer_policy,
        device=device,
    )


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    """A stateless view of ``module`` without initial weights (higher's ``make_functional``).

    The first call must pass ``params=`` (a list in ``module.parameters()`` order or a dict by
    name); those become the fast weights, as with :func:`monkeypatch`'s view. Buffers are private
    copies (``BufferPolicy.PRIVATE``).

    Args:
        module: the user's module (not modified).
        encapsulator: called as ``encapsulator(fmodel, module)`` before returning, e.g. to set
            initial fast weights with ``fmodel.update_params(...)``.
    """
    fmodel = FunctionalModule(module, None)
    if encapsulator is not None:
        encapsulator(fmodel, module)
    return fmodel
