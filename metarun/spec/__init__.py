"""What an option declares, torch- and Hydra-free: the error type of user mistakes
(``errors``), the value checks schemas run (``checks``), the choices keys offer (``enums``) and
the schema base classes through which options declare what they fit (``bases``).

Algorithms, datasets and models import only this package and :mod:`metarun.registry`; the
Hydra-facing layer (:mod:`metarun.config`) builds on it.
"""
