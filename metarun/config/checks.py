"""Start-up warnings about a valid config that probably does not do what was meant: a schedule
longer than the run (``algo=mamlpp outer_steps=100`` keeps annealing its multi-step loss over
7,500 steps).

Schemas declare their schedule keys themselves, so this module names none: a ``ClassVar``
``schedule_keys`` maps each key whose value counts outer steps (an int, a list of ints, or null
for off) to the name of the attribute that turns it on (``None``: always on), e.g. MAML's
``{"msl_anneal_steps": "multi_step_loss", "first_order_until": None}``. The run's groups are
read generically (``meta_optimizer``, ``eval``, ``algo``, ``dataset``, ``model``).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# The run's sections that may declare schedule keys, by their config prefix.
SECTIONS = ("meta_optimizer", "eval", "algo", "dataset", "model")


def declared_schedule_keys(section: Any) -> dict[str, str | None]:
    """The schedule keys a schema declares (none if it declares nothing)."""
    keys = getattr(type(section), "schedule_keys", None)
    return dict(keys) if keys else {}


def schedule_overruns(run: Any) -> list[str]:
    """One message per schedule key of ``run`` (a :class:`~metarun.config.RunConfig`) that is on
    and names an outer step beyond ``outer_steps``: the run ends before that schedule does."""
    steps = run.outer_steps
    messages: list[str] = []
    for prefix in SECTIONS:
        section = getattr(run, prefix, None)
        for key, switch in declared_schedule_keys(section).items():
            if switch is not None and not getattr(section, switch):
                continue
            value = getattr(section, key)
            if value is None:
                continue
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            beyond = [int(v) for v in values if int(v) > steps]
            if not beyond:
                continue
            shown = list(values) if isinstance(value, (list, tuple)) else value
            what = (
                f"outer step{'s' if len(beyond) > 1 else ''} "
                f"{', '.join(str(v) for v in beyond)} {'are' if len(beyond) > 1 else 'is'} "
                "never reached"
            )
            messages.append(
                f"{prefix}.{key}={shown} exceeds outer_steps={steps}: the run ends before this "
                f"schedule does ({what}); set {prefix}.{key} within outer_steps, or raise "
                "outer_steps"
            )
    return messages


def warn_schedule_overruns(run: Any) -> list[str]:
    """Logs :func:`schedule_overruns`' messages as warnings and returns them."""
    messages = schedule_overruns(run)
    for message in messages:
        log.warning("%s", message)
    return messages
