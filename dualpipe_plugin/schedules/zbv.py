"""ZB-V: the zero-bubble V schedule (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 6).

The model is cut into 2P stages placed in a V, as for DualPipeV: rank r holds stage r (chunk 0) and stage
2P-1-r (chunk 1). Every backward is split into I and W; there are no overlapped F&B pairs, so ZB-V suits
dense models (nothing to hide), where it removes DualPipeV's pair overhead. Peak activation memory equals
1F1B's (2P chunks of half a stage on every rank), and with F = I = W per chunk the only idle time left is
the warm-up of the first chunk.

Op order per rank r of P, with C micro-batches (the order of torch's ``ScheduleZBVZeroBubble``, which
``tests/schedules/test_zbv.py`` checks op for op), where n = max(C, 2P-1) and ops of micro-batches >= C
are left out:

1. ``2(P-r)-1`` forwards of chunk 0;
2. ``r`` times: forward chunk 1, forward chunk 0;
3. ``P-r`` times: forward chunk 1, then its I and W at once;
4. steady state, while chunk 0 has micro-batches left or chunk 1 lags behind it: forward chunk 0 (while
   any are left), I and W of chunk 0, forward chunk 1, I and W of chunk 1;
5. cool-down: ``r`` times I of chunk 0 then I of chunk 1 (their W deferred); ``P-r`` times I of chunk 0
   then the oldest deferred W of chunk 0; then the remaining W of chunk 1, then of chunk 0.
"""

from __future__ import annotations

from dualpipe_plugin.schedules.dualpipe import dualpipev_placement
from dualpipe_plugin.schedules.ir import Op, OpKind, Schedule
from dualpipe_plugin.schedules.spec import Constraints, ScheduleSpec

__all__ = ["ZBV", "zbv"]

F, I, W = OpKind.F, OpKind.I, OpKind.W  # noqa: E741 - the zero-bubble literature's names


def _rank_ops(num_ranks: int, rank: int, num_microbatches: int) -> list[Op]:
    n = max(num_microbatches, 2 * num_ranks - 1)  # enough micro-batches to run every phase in full
    ops: list[Op] = []
    forward, backward, weight = [0, 0], [0, 0], [0, 0]  # next micro-batch per chunk

    def run(kind: OpKind, chunk: int, counter: list[int]) -> None:
        ops.append(Op(kind, chunk, counter[chunk]))
        counter[chunk] += 1

    def backward_now(chunk: int) -> None:  # I with its W straight after
        run(I, chunk, backward)
        run(W, chunk, weight)

    for _ in range(2 * (num_ranks - rank) - 1):  # 1
        run(F, 0, forward)
    for _ in range(rank):  # 2
        run(F, 1, forward)
        run(F, 0, forward)
    for _ in range(num_ranks - rank):  # 3
        run(F, 1, forward)
        backward_now(1)
    while forward[1] < forward[0] or forward[0] < n:  # 4
        if forward[0] < n:
            run(F, 0, forward)
        backward_now(0)
        run(F, 1, forward)
        backward_now(1)
    for _ in range(rank):  # 5: cool-down
        run(I, 0, backward)
        run(I, 1, backward)
    for _ in range(num_ranks - rank):
        run(I, 0, backward)
        run(W, 0, weight)
    for chunk in (1, 0):
        while weight[chunk] < backward[chunk]:
            run(W, chunk, weight)
    assert forward == backward == weight == [n, n], "every forward needs its I and its W"
    return [op for op in ops if op.microbatch < num_microbatches]


def _generate(num_ranks: int, num_microbatches: int) -> Schedule:
    rows = tuple(tuple(_rank_ops(num_ranks, rank, num_microbatches)) for rank in range(num_ranks))
    return Schedule("zbv", dualpipev_placement(num_ranks), num_microbatches, rows)


ZBV = ScheduleSpec(
    name="zbv",
    summary="zero-bubble V: 2P stages in a V, split backwards, no F&B pairs (1F1B's memory)",
    generate=_generate,
    place=dualpipev_placement,
    constraints=Constraints(),
)


def zbv(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-V over ``num_ranks`` ranks (2P stages in a V) and ``num_microbatches`` micro-batches."""
    return ZBV.build(num_ranks, num_microbatches)
