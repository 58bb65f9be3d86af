"""1F1B and ZB1P (ZB-H1): the classic one-chunk-per-rank schedules, on the same IR for comparison.

Both run P stages on P ranks, one chunk each. Rank r warms up with ``min(P-1-r, C)`` forwards, then
alternates one forward and one backward, then drains the remaining backwards.

ZB1P splits every backward into I and W. Rank r keeps at most r weight passes pending, running the
oldest one whenever the queue grows past that: downstream ranks thereby push input gradients upstream
as early as possible, and the deferred W fill the cool-down bubble. Peak live activations stay at P,
like 1F1B, and the bubble is (P-1)(F+B-2W) against 1F1B's (P-1)(F+B).
"""

from __future__ import annotations

from dualpipe_plugin.schedules.ir import Placement, Schedule
from dualpipe_plugin.schedules.program import RankProgram
from dualpipe_plugin.schedules.spec import ScheduleSpec

__all__ = ["ONE_F_ONE_B", "ZB1P", "one_f_one_b", "zb1p", "linear_placement"]


def linear_placement(num_ranks: int) -> Placement:
    """Stage r on rank r."""
    return Placement(num_ranks, (tuple((rank, 0) for rank in range(num_ranks)),))


def _program(num_ranks: int, rank: int, num_microbatches: int, max_pending_weights: int | None) -> RankProgram:
    """``max_pending_weights=None`` gives plain 1F1B (full backwards)."""
    split = max_pending_weights is not None
    program = RankProgram()

    def backward() -> None:
        program.backward(0, split=split)
        if split and program.pending_weights > max_pending_weights:
            program.weight()

    warmup = min(num_ranks - 1 - rank, num_microbatches)
    for _ in range(warmup):
        program.forward(0)
    for _ in range(num_microbatches - warmup):
        program.forward(0)
        backward()
    for _ in range(warmup):
        backward()
    while program.pending_weights:
        program.weight()
    return program


def _one_f_one_b_rows(num_ranks: int, num_microbatches: int) -> Schedule:
    rows = tuple(tuple(_program(num_ranks, r, num_microbatches, None).actions) for r in range(num_ranks))
    return Schedule("1f1b", linear_placement(num_ranks), num_microbatches, rows)


def _zb1p_rows(num_ranks: int, num_microbatches: int) -> Schedule:
    rows = tuple(tuple(_program(num_ranks, r, num_microbatches, r).actions) for r in range(num_ranks))
    return Schedule("zb1p", linear_placement(num_ranks), num_microbatches, rows)


ONE_F_ONE_B = ScheduleSpec(
    name="1f1b",
    summary="1F1B (PipeDream-flush): P stages, one forward then one full backward",
    generate=_one_f_one_b_rows,
    place=linear_placement,
)

ZB1P = ScheduleSpec(
    name="zb1p",
    summary="ZB-H1: 1F1B with split backwards, deferred weight passes fill the bubble (1F1B's memory)",
    generate=_zb1p_rows,
    place=linear_placement,
)


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): bubble (P-1)(F+B), peak P activations on rank 0."""
    return ONE_F_ONE_B.build(num_ranks, num_microbatches)


def zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with split backwards; bubble (P-1)(F+B-2W), peak P activations on every rank."""
    return ZB1P.build(num_ranks, num_microbatches)
