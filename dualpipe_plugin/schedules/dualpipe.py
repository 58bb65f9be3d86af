"""DualPipe and DualPipeV: DeepSeek's bidirectional schedules, op for op as in their reference.

Both share one eight-phase program per rank; they differ only in placement:

- ``dualpipe``: P ranks, P stages; rank r holds stage r (direction 0, fed at rank 0) and a mirrored copy
  of stage P-1-r (direction 1, fed at rank P-1). The program runs on the "half rank" h = min(r, P-1-r)
  among n = P/2 half ranks, with C/2 micro-batches per direction.
- ``dualpipev``: P ranks, 2P stages in a V; rank r holds stage r (chunk 0) and stage 2P-1-r (chunk 1).
  The program runs on h = r among n = P, with all C micro-batches.

The phases for a rank h of n, with k micro-batches per chunk (``phase`` 0 is the chunk fed first):

1. ``2(n-h-1)`` forwards of phase 0 (warm-up).
2. ``h+1`` times: forward phase 0, forward phase 1.
3. ``n-h-1`` times: zero-bubble backward phase 1 (I), its weight pass (W), forward phase 1.
4. ``k-2n+h+1`` times (the steady state): F0&B1, then F1&B0 as overlapped pairs. On the rank where the
   two halves meet (h = n-1) the very first F0&B1 runs as a plain F then a plain B to shorten the bubble.
5. ``n-h-1`` times: backward phase 1, then F1&B0.
6. ``h+1`` times: backward phase 1, backward phase 0. From the middle iteration on, backwards are split
   (I, with W deferred); for odd h the switch happens before that iteration's phase-1 backward, for even
   h between its two backwards.
7. ``n-h-1`` times: a weight pass, then a split backward of phase 0.
8. ``h+1`` weight passes draining the queue.
"""

from __future__ import annotations

from dualpipe_plugin.schedules.ir import Placement, Schedule
from dualpipe_plugin.schedules.program import RankProgram
from dualpipe_plugin.schedules.spec import Constraints, ScheduleSpec

__all__ = ["DUALPIPE", "DUALPIPEV", "dualpipe", "dualpipev", "dualpipe_placement", "dualpipev_placement"]


def _eight_phase_program(n: int, h: int, per_chunk: int, chunk_of_phase: tuple[int, int]) -> RankProgram:
    """The op order of one rank at position ``h`` of ``n`` (see the module docstring)."""
    program = RankProgram()
    phase0, phase1 = chunk_of_phase
    meeting_rank = h == n - 1

    for _ in range(2 * (n - h - 1)):  # 1: warm-up forwards
        program.forward(phase0)
    for _ in range(h + 1):  # 2: both directions fill
        program.forward(phase0)
        program.forward(phase1)
    for _ in range(n - h - 1):  # 3: zero bubble while phase 0 drains in
        program.backward(phase1, split=True)
        program.weight()
        program.forward(phase1)
    for step in range(per_chunk - 2 * n + h + 1):  # 4: steady overlapped pairs
        if step == 0 and meeting_rank:
            program.forward(phase0)
            program.backward(phase1)
        else:
            program.pair(phase0, phase1)
        program.pair(phase1, phase0)
    for _ in range(n - h - 1):  # 5
        program.backward(phase1)
        program.pair(phase1, phase0)
    split = False
    for step in range(h + 1):  # 6: the second half of the backwards are zero-bubble
        if step == (h + 1) // 2 and h % 2 == 1:
            split = True
        program.backward(phase1, split=split)
        if step == (h + 1) // 2 and h % 2 == 0:
            split = True
        program.backward(phase0, split=split)
    for _ in range(n - h - 1):  # 7
        program.weight()
        program.backward(phase0, split=True)
    for _ in range(h + 1):  # 8: drain
        program.weight()
    assert program.pending_weights == 0, "every deferred weight pass must be drained"
    return program


def dualpipe_placement(num_ranks: int) -> Placement:
    """Direction 0 visits ranks 0..P-1 as chunk 0; direction 1 visits P-1..0 as chunk 1."""
    forward = tuple((rank, 0) for rank in range(num_ranks))
    backward = tuple((rank, 1) for rank in reversed(range(num_ranks)))
    return Placement(num_ranks, (forward, backward))


def dualpipev_placement(num_ranks: int) -> Placement:
    """One V-shaped route: down ranks 0..P-1 as chunk 0, back up P-1..0 as chunk 1."""
    down = tuple((rank, 0) for rank in range(num_ranks))
    up = tuple((rank, 1) for rank in reversed(range(num_ranks)))
    return Placement(num_ranks, (down + up,))


def _dualpipe_rows(num_ranks: int, num_microbatches: int) -> Schedule:
    half = num_ranks // 2
    rows = []
    for rank in range(num_ranks):
        second_half = rank >= half
        # The reference's phase 0 is the direction fed at this rank's own end of the pipeline.
        chunk_of_phase = (1, 0) if second_half else (0, 1)
        h = min(rank, num_ranks - 1 - rank)
        rows.append(tuple(_eight_phase_program(half, h, num_microbatches // 2, chunk_of_phase).actions))
    return Schedule("dualpipe", dualpipe_placement(num_ranks), num_microbatches, tuple(rows))


def _dualpipev_rows(num_ranks: int, num_microbatches: int) -> Schedule:
    rows = tuple(
        tuple(_eight_phase_program(num_ranks, rank, num_microbatches, (0, 1)).actions)
        for rank in range(num_ranks)
    )
    return Schedule("dualpipev", dualpipev_placement(num_ranks), num_microbatches, rows)


DUALPIPE = ScheduleSpec(
    name="dualpipe",
    summary="bidirectional: P stages held twice (rank r: stage r and a mirrored P-1-r), F&B pairs",
    generate=_dualpipe_rows,
    place=dualpipe_placement,
    constraints=Constraints(
        microbatches_per_rank=2,
        even_ranks="each rank pairs with rank P-1-r; use an even pipeline size or the 'dualpipev' schedule, "
        "which takes any",
        even_microbatches="feeds half the micro-batches from each end",
    ),
)

DUALPIPEV = ScheduleSpec(
    name="dualpipev",
    summary="DualPipe cut in half: 2P stages in a V (rank r: stages r and 2P-1-r), F&B pairs",
    generate=_dualpipev_rows,
    place=dualpipev_placement,
    constraints=Constraints(microbatches_per_rank=2),
)


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipe over ``num_ranks`` (even) ranks and ``num_microbatches`` in total (even, >= 2P)."""
    return DUALPIPE.build(num_ranks, num_microbatches)


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """DualPipeV over ``num_ranks`` ranks (2P stages) and ``num_microbatches`` (>= 2P, odd allowed)."""
    return DUALPIPEV.build(num_ranks, num_microbatches)
