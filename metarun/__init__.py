"""metarun: a command-line meta-learning experiment runner.

The differentiable-unroll core lives in :mod:`metarun.unroll` and imports torch only.
``metarun.load(checkpoint)`` returns a meta-trained :class:`~metarun.runner.learner.Learner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    # `metarun.load` imports the runner (and Hydra/OmegaConf) on first use only, so that
    # `import metarun.unroll` stays torch-only.
    if name == "load":
        from metarun.runner.api import load

        return load
    raise AttributeError(f"module 'metarun' has no attribute {name!r}")


if TYPE_CHECKING:
    from metarun.runner.api import load
