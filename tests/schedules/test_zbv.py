"""ZB-V: op for op torch's ScheduleZBVZeroBubble, and the published ZB-V figures.

Published (Qi et al., ICLR 2024, section 6; sail-sg's comparison table at T_F = T_B = T_W): activation
memory 1x 1F1B's, pipeline communication about 2x 1F1B's, bubble rate 0 as the micro-batch count grows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dualpipe_plugin.schedules import CostModel, Op, OpKind, build_schedule, get_schedule, lower, simulate

torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")


_KINDS = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}


def _torch_order(num_ranks: int, num_microbatches: int) -> list[list[str]]:
    """torch's per-rank ZB-V order in our text form (chunk 0 = stage r, chunk 1 = stage 2P-1-r).

    ``_calculate_single_rank_operations`` reads only these three attributes of the schedule object, so it
    runs without pipeline stages or a process group.
    """
    fields = SimpleNamespace(pp_group_size=num_ranks, num_stages=2 * num_ranks, _n_microbatches=num_microbatches)
    orders = []
    for rank in range(num_ranks):
        actions = torch_schedules.ScheduleZBVZeroBubble._calculate_single_rank_operations(fields, rank)
        orders.append([
            f"{_KINDS[action.computation_type.name]}{0 if action.stage_index == rank else 1}:{action.microbatch_index}"
            for action in actions if action is not None
        ])
    return orders


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("multiple", [0.5, 1, 2, 3])
def test_op_order_equals_torch(num_ranks: int, multiple: float) -> None:
    num_microbatches = max(1, int(multiple * 2 * num_ranks))
    ours = build_schedule("zbv", num_ranks, num_microbatches)
    assert [[str(op) for op in ours.ops(rank)] for rank in range(num_ranks)] == _torch_order(num_ranks, num_microbatches)


def test_runs_any_microbatch_count_and_splits_every_backward() -> None:
    for num_ranks in range(1, 7):
        for num_microbatches in range(1, 3 * num_ranks + 2):
            schedule = build_schedule("zbv", num_ranks, num_microbatches)  # validated by the generator tests too
            kinds = {op.kind for rank in range(num_ranks) for op in schedule.ops(rank)}
            assert kinds == {OpKind.F, OpKind.I, OpKind.W}


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_activation_memory_equals_1f1b(num_ranks: int) -> None:
    """2P chunks of half a stage on every rank = 1F1B's P stages on its rank 0."""
    num_microbatches = 4 * num_ranks
    zbv = simulate(build_schedule("zbv", num_ranks, num_microbatches))
    one_f_one_b = simulate(build_schedule("1f1b", num_ranks, num_microbatches))
    assert zbv.peak_activations_per_rank == (2 * num_ranks,) * num_ranks
    assert max(zbv.peak_activations_per_rank) / 2 == max(one_f_one_b.peak_activations_per_rank)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("multiple", [2, 4, 8])
def test_bubble_vanishes_with_the_microbatch_count(num_ranks: int, multiple: int) -> None:
    """At F = I = W per chunk the only idle time is the first chunk's fill, (P-1) F per rank, whatever C is:
    the bubble rate (P-1)/(6C) goes to 0 as C grows (1F1B's is (P-1)/C)."""
    num_microbatches = multiple * num_ranks
    result = simulate(build_schedule("zbv", num_ranks, num_microbatches), CostModel(F=1, B=2, W=1))
    assert result.idle_per_rank == pytest.approx([num_ranks - 1] * num_ranks)
    assert result.bubble_fraction == pytest.approx((num_ranks - 1) / (6 * num_microbatches + num_ranks - 1))


def _rank_crossings_per_microbatch(name: str, num_ranks: int) -> float:
    schedule = build_schedule(name, num_ranks, 2 * num_ranks)
    sends = [io.send for row in lower(schedule) for _, io in row if io.send is not None]
    return sum(1 for t in sends if t.src_rank != t.dst_rank) / schedule.num_microbatches


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_communication_is_twice_1f1b(num_ranks: int) -> None:
    """Down and back up the V a micro-batch crosses 2(P-1) rank boundaries each way (the turn at rank P-1
    is a local hand-over) against 1F1B's P-1."""
    assert _rank_crossings_per_microbatch("1f1b", num_ranks) == 2 * (num_ranks - 1)
    assert _rank_crossings_per_microbatch("zbv", num_ranks) == 4 * (num_ranks - 1)


def test_placement_is_the_v() -> None:
    spec = get_schedule("zbv")
    assert spec.chunks_per_rank == 2 and not spec.mirrored
    assert spec.placement(4) == get_schedule("dualpipev").placement(4)
    assert isinstance(next(iter(build_schedule("zbv", 2, 4).ops(0))), Op)
