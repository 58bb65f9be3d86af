"""The schedule IR: ops and pairs convert to and from text, whole schedules round-trip, placements are right."""

from __future__ import annotations

import dataclasses

import pytest

from dualpipe_plugin.schedules import (
    Op,
    OpKind,
    Pair,
    ScheduleError,
    ScheduleParseError,
    build_schedule,
    parse_action,
    parse_ranks,
)
from dualpipe_plugin.schedules.ir import format_ranks


# --- ops and pairs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["F0:0", "B1:12", "I0:3", "W1:0", "F0:3&B1:1", "F1:10&B0:7", "F0:0&B0:1"])
def test_action_text_round_trip(text: str) -> None:
    assert str(parse_action(text)) == text


def test_parse_op_fields() -> None:
    op = parse_action("I1:12")
    assert op == Op(OpKind.I, 1, 12)
    assert (op.kind, op.chunk, op.microbatch, op.key) == (OpKind.I, 1, 12, (1, 12))
    assert op.ops() == (op,)
    assert not OpKind.F.is_backward and not OpKind.W.is_backward
    assert OpKind.B.is_backward and OpKind.I.is_backward


def test_parse_pair_fields() -> None:
    pair = parse_action("F0:3&B1:1")
    assert isinstance(pair, Pair)
    assert pair.forward == Op(OpKind.F, 0, 3)
    assert pair.backward == Op(OpKind.B, 1, 1)
    assert pair.ops() == (pair.forward, pair.backward)


def test_actions_are_immutable_and_hashable() -> None:
    op = parse_action("F0:1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.microbatch = 2  # type: ignore[misc]
    assert len({parse_action("F0:1"), parse_action("F0:1"), parse_action("F0:1&B1:0")}) == 2


@pytest.mark.parametrize("text", ["F0:1&I1:0", "I0:1&B1:0", "B0:1&F1:0", "F0:1&F1:0", "F0:1&W1:0"])
def test_pair_must_be_forward_and_full_backward(text: str) -> None:
    with pytest.raises(ScheduleParseError, match="overlapped pair is F&B"):
        parse_action(text)


@pytest.mark.parametrize(
    "text", ["", "X0:1", "F0", "F:1", "F0:", "F-1:0", "f0:1", "F0:1:2", "F0:1&", "&B0:1", "F0:1&B1:1&B0:2", "F 0:1"]
)
def test_parse_action_errors(text: str) -> None:
    with pytest.raises(ScheduleParseError, match="cannot parse op") as info:
        parse_action(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ScheduleError)
    assert "for example 'F0:3'" in str(info.value)  # the message shows the form to use


# --- whole schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, ranks, microbatches",
    [("dualpipe", 4, 8), ("dualpipe", 6, 20), ("dualpipev", 1, 3), ("dualpipev", 3, 7), ("1f1b", 4, 9), ("zb1p", 3, 5)],
)
def test_schedule_text_round_trip(name: str, ranks: int, microbatches: int) -> None:
    schedule = build_schedule(name, ranks, microbatches)
    text = schedule.to_text()
    assert str(schedule) == text
    rows = parse_ranks(text)
    assert rows == [list(row) for row in schedule.actions]
    assert format_ranks(rows) == text
    lines = text.splitlines()
    assert len(lines) == ranks
    assert all(line.startswith(f"rank {rank}: ") for rank, line in enumerate(lines))


def test_parse_ranks_tolerates_surrounding_whitespace() -> None:
    rows = parse_ranks("\n  rank 0: F0:0 B0:0\n rank 1 :  F0:0   B0:0  \n\n")
    assert [[str(a) for a in row] for row in rows] == [["F0:0", "B0:0"], ["F0:0", "B0:0"]]


def test_parse_ranks_empty_row() -> None:
    assert parse_ranks("rank 0:\nrank 1: F0:0") == [[], [Op(OpKind.F, 0, 0)]]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("rank 1: F0:0", "line 1: expected 'rank 0: OP OP ...'"),
        ("rank 0: F0:0\nrank 2: F0:0", "line 2: expected 'rank 1: OP OP ...'"),
        ("rank 0: F0:0\nrank 0: F0:0", "line 2: expected 'rank 1"),
        ("r0: F0:0", "line 1"),
        ("rank 0 F0:0", "line 1"),
        ("rank 0: F0:0 Q0:1", "cannot parse op 'Q0:1'"),
        ("rank 0: F0:0&I1:0", "overlapped pair is F&B"),
    ],
)
def test_parse_ranks_errors(text: str, needle: str) -> None:
    with pytest.raises(ScheduleParseError) as info:
        parse_ranks(text)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


# --- placement -----------------------------------------------------------------------------------------


def test_dualpipe_placement_p4() -> None:
    schedule = build_schedule("dualpipe", 4, 8)
    placement = schedule.placement
    assert placement.num_ranks == 4 and placement.num_stages == 4 and placement.num_chunks == 2
    assert placement.mirrored
    for rank in range(4):
        # chunk 0 is direction 0 (fed at rank 0), chunk 1 the mirrored copy fed at rank P-1
        assert placement.stage(rank, 0) == rank
        assert placement.stage(rank, 1) == 3 - rank
        assert placement.mirror_of(rank, 0) == (3 - rank, 1)
        assert placement.mirror_of(rank, 1) == (3 - rank, 0)
        assert placement.holds(rank, 0) and placement.holds(rank, 1) and not placement.holds(rank, 2)
    assert placement.flow_of(0) == 0 and placement.flow_of(1) == 1
    assert placement.next_hop(0, 0) == (1, 0) and placement.next_hop(2, 0) == (3, 0)
    assert placement.next_hop(3, 0) is None and placement.is_last(3, 0)
    assert placement.prev_hop(0, 0) is None and placement.is_first(0, 0)
    assert placement.prev_hop(1, 0) == (0, 0)
    # direction 1 enters at rank 3 and leaves at rank 0
    assert placement.prev_hop(3, 1) is None and placement.is_first(3, 1)
    assert placement.next_hop(3, 1) == (2, 1) and placement.next_hop(1, 1) == (0, 1)
    assert placement.next_hop(0, 1) is None and placement.is_last(0, 1)
    assert placement.slot(2, 1) == (1, 1, (3, 1), (1, 1))  # flow, stage, prev, next
    # the second direction takes the second half of the user's micro-batches
    assert schedule.microbatches_per_flow() == 4
    assert schedule.global_microbatch(0, 3) == 3 and schedule.global_microbatch(1, 0) == 4


def test_dualpipev_placement_p3() -> None:
    schedule = build_schedule("dualpipev", 3, 7)
    placement = schedule.placement
    assert placement.num_ranks == 3 and placement.num_stages == 6 and placement.num_chunks == 2
    assert not placement.mirrored
    for rank in range(3):
        assert placement.stage(rank, 0) == rank
        assert placement.stage(rank, 1) == 2 * 3 - 1 - rank
        assert placement.mirror_of(rank, 0) is None and placement.mirror_of(rank, 1) is None
    assert placement.flow_of(0) == placement.flow_of(1) == 0
    assert placement.prev_hop(0, 0) is None and placement.next_hop(0, 0) == (1, 0)
    # the bottom of the V: rank P-1 hands chunk 0's output to its own chunk 1
    assert placement.next_hop(2, 0) == (2, 1) and placement.prev_hop(2, 1) == (2, 0)
    assert placement.next_hop(1, 1) == (0, 1) and placement.prev_hop(0, 1) == (1, 1)
    assert placement.next_hop(0, 1) is None and placement.is_last(0, 1)
    assert schedule.microbatches_per_flow() == 7 and schedule.global_microbatch(1, 6) == 6


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_linear_placement(name: str) -> None:
    placement = build_schedule(name, 4, 4).placement
    assert placement.num_stages == 4 and placement.num_chunks == 1 and not placement.mirrored
    assert [placement.stage(rank, 0) for rank in range(4)] == [0, 1, 2, 3]
    assert [placement.next_hop(rank, 0) for rank in range(4)] == [(1, 0), (2, 0), (3, 0), None]
    assert [placement.prev_hop(rank, 0) for rank in range(4)] == [None, (0, 0), (1, 0), (2, 0)]
    assert not placement.holds(0, 1)
    assert placement.mirror_of(1, 0) is None
