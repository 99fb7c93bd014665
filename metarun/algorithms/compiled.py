"""``compile=true``: an algorithm's batched meta-step through ``torch.compile``, with a fallback.

Compilation can fail for reasons outside the user's config (no C++ compiler for the CPU
backend, an operator the compiler does not support, a torch version's bug). A run must not end
there: the first failure is logged as a warning and the function then runs eagerly for the rest
of the run, computing the same values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: dynamo's own errors (a backend that failed wraps the
    compiler's error in BackendCompilerFailed) and the runtime errors that escape from
    inductor's code generation and C++ builds. (Imported here: torch._dynamo takes a second to
    import, which a run without compile=true should not pay.)"""
    import torch._dynamo

    return (torch._dynamo.exc.TorchDynamoException, RuntimeError, OSError)


def check_backend(backend: str) -> None:
    """Raises ValueError naming ``compile_backend`` when torch has no such backend."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        usual = ["inductor", "aot_eager", "eager", *torch._dynamo.list_backends()]
        raise ValueError(
            f"compile_backend={backend!r} is not a torch.compile backend; use inductor (the "
            f"default), aot_eager or eager (no code generation), or one of "
            f"{', '.join(sorted(set(usual)))}"
        )


class CompiledOrEager:
    """``fn`` through ``torch.compile(fn, backend=backend)``; eager ``fn`` after a failure.

    Args:
        fn: the function to compile (e.g. a ``torch.func.vmap`` of one task's meta-loss).
        what: names it in the warning.
        backend: a ``torch.compile`` backend (``inductor``: generated kernels; ``aot_eager``:
            traced graphs run by eager kernels, no code generation).

    Attributes:
        failed: the error that made it fall back, ``None`` while compilation works.
    """

    def __init__(self, fn: Callable[..., Any], what: str, backend: str = "inductor") -> None:
        self.fn = fn
        self.what = what
        self.compiled: Callable[..., Any] | None = torch.compile(fn, backend=backend)
        self.failed: BaseException | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except _compile_errors() as exc:
                self.failed = exc
                self.compiled = None
                log.warning(
                    "compile=true: torch.compile failed for %s (%s: %s); running it eagerly "
                    "for the rest of the run (same results, no compiled speed-up). Set "
                    "compile=false to skip the attempt.",
                    self.what,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
        return self.fn(*args)
