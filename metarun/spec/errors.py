"""The one exception type for user mistakes in a configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that is well-typed but unusable.

    The message names the full key, the bad value and a fix, e.g.
    ``algo.inner_steps must be >= 1, got 0 (set e.g. algo.inner_steps=5)``. The CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """
