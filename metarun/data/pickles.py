"""Reading the pickles data sets come in (the official CIFAR batches, the community's
miniImageNet and tieredImageNet files) without letting a file run code."""

from __future__ import annotations

import pickle
from typing import IO, Any


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays, numpy scalars, dtypes and plain containers: all that those
    files hold. Anything else raises ``UnpicklingError`` naming it, so a tampered file cannot
    run code. Files pickled before NumPy 2 name ``numpy.core``, later ones ``numpy._core``."""

    _ALLOWED = {
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: data pickles hold only numpy arrays, dicts, "
                f"lists and strings"
            )
        if module == "numpy.core.multiarray":
            # NumPy 2 renamed numpy.core to numpy._core (the old name loads with a warning).
            try:
                return super().find_class("numpy._core.multiarray", name)
            except ModuleNotFoundError:  # NumPy 1
                pass
        return super().find_class(module, name)


def load_numpy_pickle(handle: IO[bytes]) -> Any:
    """The object pickled in ``handle``, through :class:`NumpyUnpickler`."""
    # latin1: files pickled by Python 2 hold numpy buffers (and CIFAR's keys) as str.
    return NumpyUnpickler(handle, encoding="latin1").load()


def text(value: Any) -> str:
    """A key or name from a pickle, as ``str`` (Python 2 pickles hold bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
