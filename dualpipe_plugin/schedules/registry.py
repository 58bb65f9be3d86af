"""The schedule registry: name -> generator. A new schedule is one generator module plus one line here."""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from dualpipe_plugin.schedules.dualpipe import dualpipe, dualpipev
from dualpipe_plugin.schedules.errors import ScheduleConfigError
from dualpipe_plugin.schedules.ir import Schedule
from dualpipe_plugin.schedules.one_f_one_b import one_f_one_b, zb1p

__all__ = ["Generator", "SCHEDULES", "schedule_names", "build_schedule"]

Generator = Callable[[int, int], Schedule]

SCHEDULES: Mapping[str, Generator] = MappingProxyType({
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
})
"""Read-only: the four built-in schedules, (num_ranks, num_microbatches) -> Schedule."""


def schedule_names() -> tuple[str, ...]:
    return tuple(SCHEDULES)


def build_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Build a registered schedule; unknown names raise with the list of valid ones."""
    try:
        generator = SCHEDULES[name.lower()]
    except (KeyError, AttributeError):
        raise ScheduleConfigError(
            f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}"
        ) from None
    if not isinstance(num_ranks, int) or not isinstance(num_microbatches, int):
        raise ScheduleConfigError(
            f"ranks and microbatches must be integers, got ranks={num_ranks!r}, microbatches={num_microbatches!r}"
        )
    return generator(num_ranks, num_microbatches)
