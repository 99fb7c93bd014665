"""metarun: a command-line meta-learning experiment runner.

The differentiable-unroll core lives in :mod:`metarun.unroll` and imports torch only.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
