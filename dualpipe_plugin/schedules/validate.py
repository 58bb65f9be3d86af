"""The validator: proves a schedule complete, placed consistently and free of deadlock. Read-only.

Completeness: every (chunk, micro-batch) slot of every rank gets exactly one ``F`` and either one ``B`` or
one ``I`` plus one ``W``. Deadlock freedom: with sends posted as soon as an op produces its output and
receives waited for just before the op that consumes them (how the runtime runs), a rank can only block
on an input that another rank has not produced yet; the schedule is deadlock-free exactly when the
per-rank orders plus the derived transfers form an acyclic graph, which :func:`walk` decides. Every
error names the rank, the op and what it waits for, above the rank x step grid.
"""

from __future__ import annotations

from dualpipe_plugin.schedules.costs import CostModel
from dualpipe_plugin.schedules.ir import Schedule
from dualpipe_plugin.schedules.simulate import walk
from dualpipe_plugin.schedules.structure import check_structure

__all__ = ["validate"]


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleInvalidError` unless ``schedule`` is complete and deadlock-free."""
    check_structure(schedule)
    walk(schedule, CostModel())
