"""Meta-learning algorithms: small modules against :class:`~metarun.algorithms.base.MetaAlgorithm`.

Importing this package registers every built-in ``algo`` option (:mod:`metarun.registry`); an
algorithm module is added with one import line here (docs/extending.md: the whole recipe; the
commit adding an algorithm lists only new files and that line).
"""

# Import order = registration order = the order help and error messages list options in.
# isort: skip_file

from __future__ import annotations

from metarun.algorithms import maml  # noqa: F401
from metarun.algorithms import fomaml  # noqa: F401
from metarun.algorithms import mamlpp  # noqa: F401
from metarun.algorithms import metasgd  # noqa: F401
from metarun.algorithms import anil  # noqa: F401
from metarun.algorithms import reptile  # noqa: F401
from metarun.algorithms import protonets  # noqa: F401
from metarun.algorithms import imaml  # noqa: F401
from metarun.algorithms import l2rw  # noqa: F401
from metarun.algorithms import mwn  # noqa: F401
from metarun.algorithms import maml_rl  # noqa: F401
