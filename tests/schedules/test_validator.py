"""The validator on broken schedules: each error names the rank and the op, and marks it in the grid (``>>``)."""

from __future__ import annotations

import dataclasses

import pytest

from dualpipe_plugin.schedules import (
    Schedule,
    ScheduleError,
    ScheduleInvalidError,
    build_schedule,
    parse_ranks,
    simulate,
    validate,
)


def _with_text(schedule: Schedule, text: str) -> Schedule:
    """The same schedule (name, placement, C) with other per-rank actions."""
    return dataclasses.replace(schedule, actions=tuple(tuple(row) for row in parse_ranks(text)))


def _edit(schedule: Schedule, rank: int, edit) -> Schedule:
    """Apply ``edit(list_of_tokens) -> list_of_tokens`` to one rank's row."""
    lines = schedule.to_text().splitlines()
    prefix, _, body = lines[rank].partition(": ")
    lines[rank] = f"{prefix}: " + " ".join(edit(body.split()))
    return _with_text(schedule, "\n".join(lines))


def _swap(i: int, j: int):
    def edit(tokens: list[str]) -> list[str]:
        tokens[i], tokens[j] = tokens[j], tokens[i]
        return tokens

    return edit


def _invalid(schedule: Schedule, *needles: str) -> str:
    """Validate (and simulate) a broken schedule; both raise the same error containing ``needles`` and ``>>``."""
    with pytest.raises(ScheduleInvalidError) as info:
        validate(schedule)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ScheduleError)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert ">>" in message and "<<" in message, message
    with pytest.raises(ScheduleInvalidError) as again:
        simulate(schedule)
    assert str(again.value) == message
    return message


def test_generated_schedules_validate() -> None:
    for name, p, c in [("dualpipe", 4, 8), ("dualpipev", 4, 8), ("1f1b", 4, 8), ("zb1p", 4, 8)]:
        validate(build_schedule(name, p, c))


# --- deadlocks -----------------------------------------------------------------------------------------


def test_swapping_two_ops_deadlocks_dualpipe() -> None:
    # rank 1: F1:0 F0:0 F1:1 B0:0 F0:1&B1:0 B0:1 I1:1 W1:1 -> I1:1 moved ahead of the pair whose F0:1
    # rank 0 needs before it can send I1:1's output gradient: a cycle across the two ranks.
    schedule = _edit(build_schedule("dualpipe", 2, 4), 1, _swap(3, 6))
    message = _invalid(
        schedule,
        "deadlocks",
        "rank 1 step 3 (I1:1) waits for the input gradient of micro-batch 1 at rank 0 chunk 1",
        "rank 0 step 4 (F1:1&B0:0) waits for",
        ">>I1:1<<",
        ">>F1:1&B0:0<<",
    )
    assert "rank(s) wait forever" in message


def test_swapping_ops_on_two_ranks_deadlocks_1f1b() -> None:
    # rank 0 runs B0:0 before F0:1; rank 1 runs F0:1 before B0:0: each waits for the other
    schedule = _with_text(build_schedule("1f1b", 2, 2), "rank 0: F0:0 B0:0 F0:1 B0:1\nrank 1: F0:0 F0:1 B0:0 B0:1")
    _invalid(
        schedule,
        "rank 0 step 1 (B0:0) waits for the input gradient of micro-batch 0 at rank 1 chunk 0",
        "rank 1 step 1 (F0:1) waits for the forward output of micro-batch 1 at rank 0 chunk 0",
        "rank 0: F0:0 >>B0:0<<",
    )


def test_swapped_forwards_deadlock_dualpipev() -> None:
    schedule = _edit(build_schedule("dualpipev", 2, 4), 0, _swap(0, 3))  # F1:0 first on rank 0
    _invalid(
        schedule,
        "rank 0 step 0 (F1:0) waits for the forward output of micro-batch 0 at rank 1 chunk 1",
        "rank 1 step 0 (F0:0) waits for the forward output of micro-batch 0 at rank 0 chunk 0",
    )


def test_weight_pass_before_its_input_pass() -> None:
    # rank 0 of the traced dualpipe ends with ... I0:3 W0:3; put W0:3 first
    schedule = _edit(build_schedule("dualpipe", 4, 8), 0, lambda t: t[:-2] + [t[-1], t[-2]])
    _invalid(schedule, "rank 0 step 14 (W0:3) waits for", "the input gradient of micro-batch 3", "later on this same rank", ">>W0:3<<")


def test_backward_before_forward_on_the_same_rank() -> None:
    schedule = _with_text(build_schedule("1f1b", 2, 2), "rank 0: F0:0 F0:1 B0:0 B0:1\nrank 1: B0:0 F0:0 F0:1 B0:1")
    _invalid(
        schedule,
        "rank 1 step 0 (B0:0) waits for the forward output of micro-batch 0 at rank 1 chunk 0, "
        "later on this same rank (ops out of order)",
        "rank 1: >>B0:0<< F0:0",
    )


# --- structure -----------------------------------------------------------------------------------------


def test_dropped_forward() -> None:
    schedule = _edit(build_schedule("dualpipe", 4, 8), 0, lambda t: t[1:])  # rank 0 loses F0:0
    _invalid(schedule, "rank 0 never runs F0:0", ">>(end)<<")


def test_dropped_backward() -> None:
    schedule = _edit(build_schedule("dualpipe", 4, 8), 1, lambda t: [x for x in t if x != "B0:2"])
    _invalid(schedule, "rank 1 needs exactly one backward (B0:2 or I0:2)", "found 0", "  rank 1: ", ">>(end)<<")


def test_dropped_weight_pass() -> None:
    schedule = _edit(build_schedule("zb1p", 3, 5), 2, lambda t: [x for x in t if x != "W0:4"])
    _invalid(schedule, "on rank 2, I0:4 has no W0:4", ">>I0:4<<")


def test_weight_pass_of_a_full_backward() -> None:
    schedule = _edit(build_schedule("1f1b", 2, 3), 1, lambda t: t + ["W0:1"])
    _invalid(schedule, "on rank 1, W0:1 has no I0:1", ">>W0:1<<")


def test_duplicated_op() -> None:
    schedule = _edit(build_schedule("dualpipe", 4, 8), 3, lambda t: t[:2] + ["F1:0"] + t[2:])
    message = _invalid(schedule, "op F1:0 appears twice on rank 3")
    assert "rank 3: F1:0 F1:1 >>F1:0<< F1:2" in message


def test_duplicated_op_inside_a_pair() -> None:
    # rank 1 of dualpipe P=2 C=4 runs F0:1&B1:0; add a second plain F0:1 after it
    schedule = _edit(build_schedule("dualpipe", 2, 4), 1, lambda t: t[:5] + ["F0:1"] + t[5:])
    _invalid(schedule, "op F0:1 appears twice on rank 1", ">>F0:1<<")


def test_both_full_and_split_backward() -> None:
    schedule = _edit(build_schedule("zb1p", 2, 2), 1, lambda t: t + ["B0:0"])
    _invalid(schedule, "rank 1 needs exactly one backward (B0:0 or I0:0)", "found 2", ">>B0:0<<")


@pytest.mark.parametrize("name, bad", [("1f1b", "F1:0"), ("dualpipe", "F2:0"), ("dualpipev", "W5:0")])
def test_op_on_a_chunk_the_rank_does_not_hold(name: str, bad: str) -> None:
    schedule = _edit(build_schedule(name, 2, 4), 1, lambda t: t[:2] + [bad] + t[2:])
    chunk = bad[1]
    _invalid(schedule, f"rank 1 holds no chunk {chunk} (op {bad})", f">>{bad}<<")


@pytest.mark.parametrize(
    "name, p, c, bad, outside",
    [("dualpipe", 4, 8, "F0:4", "0..3"), ("dualpipev", 3, 7, "F1:7", "0..6"), ("zb1p", 2, 3, "W0:9", "0..2")],
)
def test_microbatch_out_of_range(name: str, p: int, c: int, bad: str, outside: str) -> None:
    schedule = _edit(build_schedule(name, p, c), p - 1, lambda t: t + [bad])
    _invalid(schedule, f"op {bad} on rank {p - 1} names micro-batch {bad.split(':')[1]}, outside {outside}", f">>{bad}<<")


def test_wrong_number_of_rank_rows() -> None:
    schedule = build_schedule("1f1b", 3, 3)
    broken = dataclasses.replace(schedule, actions=schedule.actions[:2])
    with pytest.raises(ScheduleInvalidError, match="has 2 rank rows for 3 ranks"):
        validate(broken)


def test_error_grid_is_cut_around_the_mark() -> None:
    """On a big schedule the grid shows a window around the failing step, not thousands of ops."""
    schedule = _edit(build_schedule("dualpipev", 8, 64), 5, lambda t: t[:100] + t[101:])
    with pytest.raises(ScheduleInvalidError) as info:
        validate(schedule)
    message = str(info.value)
    assert ">>" in message and "rank 5" in message
    assert max(len(line) for line in message.splitlines()) < 300
    assert "... (step " in message
