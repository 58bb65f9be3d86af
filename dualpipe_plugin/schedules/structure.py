"""Structural checks of a schedule: every slot complete, every op on a chunk its rank holds. Read-only."""

from __future__ import annotations

from dualpipe_plugin.schedules.errors import ScheduleInvalidError
from dualpipe_plugin.schedules.grid import format_grid
from dualpipe_plugin.schedules.ir import OpKind, Pair, Schedule

__all__ = ["check_structure"]


def _fail(schedule: Schedule, message: str, rank: int, step: int) -> ScheduleInvalidError:
    return ScheduleInvalidError(f"schedule {schedule.name!r}: {message}\n{format_grid(schedule, {rank: step})}")


def check_structure(schedule: Schedule) -> None:
    """Completeness and placement checks, without the deadlock walk."""
    placement = schedule.placement
    if len(schedule.actions) != schedule.num_ranks:
        raise ScheduleInvalidError(
            f"schedule {schedule.name!r} has {len(schedule.actions)} rank rows for {schedule.num_ranks} ranks"
        )
    per_flow = schedule.microbatches_per_flow()
    for rank in range(schedule.num_ranks):
        seen: dict[tuple, int] = {}
        for step, action in enumerate(schedule.actions[rank]):
            for op in action.ops():
                if not placement.holds(rank, op.chunk):
                    raise _fail(schedule, f"rank {rank} holds no chunk {op.chunk} (op {op})", rank, step)
                if not 0 <= op.microbatch < per_flow:
                    raise _fail(
                        schedule,
                        f"op {op} on rank {rank} names micro-batch {op.microbatch}, outside 0..{per_flow - 1}",
                        rank,
                        step,
                    )
                if seen.setdefault((op.kind, op.chunk, op.microbatch), step) != step or (
                    isinstance(action, Pair) and action.forward == action.backward
                ):
                    raise _fail(schedule, f"op {op} appears twice on rank {rank}", rank, step)
        for chunk in range(placement.num_chunks):
            if not placement.holds(rank, chunk):
                continue
            for m in range(per_flow):
                _check_slot(schedule, rank, chunk, m, seen)


def _check_slot(schedule: Schedule, rank: int, chunk: int, m: int, seen: dict[tuple, int]) -> None:
    # A missing op is marked at the end of the rank's row (">>(end)<<"): the rank finishes without it.
    end = len(schedule.actions[rank])
    full, split, weight = ((kind, chunk, m) in seen for kind in (OpKind.B, OpKind.I, OpKind.W))
    if (OpKind.F, chunk, m) not in seen:
        raise _fail(schedule, f"rank {rank} never runs F{chunk}:{m}", rank, end)
    if full + split != 1:
        step = max(seen[(OpKind.B, chunk, m)], seen[(OpKind.I, chunk, m)]) if full and split else end
        raise _fail(
            schedule,
            f"rank {rank} needs exactly one backward (B{chunk}:{m} or I{chunk}:{m}) of {chunk}:{m}, "
            f"found {full + split}",
            rank,
            step,
        )
    if split != weight:
        what = f"I{chunk}:{m} has no W{chunk}:{m}" if split else f"W{chunk}:{m} has no I{chunk}:{m}"
        step = seen[(OpKind.I if split else OpKind.W, chunk, m)]
        raise _fail(schedule, f"on rank {rank}, {what}", rank, step)
