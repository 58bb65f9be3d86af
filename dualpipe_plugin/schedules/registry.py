"""The schedule registry: name -> :class:`~dualpipe_plugin.schedules.spec.ScheduleSpec`.

A new schedule is one generator module that defines its spec, plus one line in ``_BUILT_IN`` below;
the runtime, the DeepSpeed key, the Megatron flag, the CLI, the advisor and the benchmarks all read this
table and need nothing else.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Mapping

from dualpipe_plugin.schedules.errors import ScheduleConfigError
from dualpipe_plugin.schedules.ir import Schedule
from dualpipe_plugin.schedules.spec import ScheduleSpec

__all__ = ["SCHEDULES", "schedule_names", "get_schedule", "build_schedule"]

_BUILT_IN = (
    "dualpipe_plugin.schedules.dualpipe:DUALPIPE",
    "dualpipe_plugin.schedules.dualpipe:DUALPIPEV",
    "dualpipe_plugin.schedules.one_f_one_b:ONE_F_ONE_B",
    "dualpipe_plugin.schedules.one_f_one_b:ZB1P",
    "dualpipe_plugin.schedules.zbv:ZBV",
)
"""Where each built-in spec is defined (module:attribute), in the order help texts list them."""


def _load(where: str) -> ScheduleSpec:
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr)


SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType({spec.name: spec for spec in map(_load, _BUILT_IN)})
"""Read-only: every built-in schedule by name."""


def schedule_names() -> tuple[str, ...]:
    return tuple(SCHEDULES)


def get_schedule(name: str | ScheduleSpec) -> ScheduleSpec:
    """The spec registered under ``name`` (case-insensitive); a spec is returned as it is. Unknown names
    raise :class:`ScheduleConfigError` listing the valid ones."""
    if isinstance(name, ScheduleSpec):
        return name
    spec = SCHEDULES.get(name.strip().lower()) if isinstance(name, str) else None
    if spec is None:
        raise ScheduleConfigError(f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    return spec


def build_schedule(name: str | ScheduleSpec, num_ranks: int, num_microbatches: int) -> Schedule:
    """Build a registered schedule (see :meth:`ScheduleSpec.build`)."""
    return get_schedule(name).build(num_ranks, num_microbatches)
