"""Generators: DeepSeek's traced op orders, golden files, and properties over grids of (P, C).

The golden files under ``golden/`` are regenerated and compared byte for byte; see ``regen_golden.py`` for
how to rewrite them after an intended change (``DUALPIPE_REGEN_GOLDEN=1`` does it through this test).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualpipe_plugin.schedules import Op, OpKind, Pair, Schedule, build_schedule, parse_ranks, schedule_names, validate

try:  # tests/schedules has no __init__.py, so pytest puts that folder on sys.path
    from regen_golden import GOLDEN_DIR, golden_cases, golden_path, render
except ImportError:  # pragma: no cover - if tests/schedules ever becomes a package
    from .regen_golden import GOLDEN_DIR, golden_cases, golden_path, render

# Copied verbatim from DESIGN.md, "Ground truth": DeepSeek's reference op order, traced from its own code.
DUALPIPE_P4_C8_TRACE = """\
rank 0: F0:0 F0:1 F0:2 F1:0 I1:0 W1:0 F1:1 F0:3&B1:1 F1:2&B0:0 B1:2 F1:3&B0:1 B1:3 I0:2 W0:2 I0:3 W0:3
rank 1: F0:0 F1:0 F0:1 F1:1 F0:2 B1:0 F1:2&B0:0 F0:3&B1:1 F1:3&B0:1 B1:2 B0:2 I1:3 I0:3 W1:3 W0:3
rank 2: F1:0 F0:0 F1:1 F0:1 F1:2 B0:0 F0:2&B1:0 F1:3&B0:1 F0:3&B1:1 B0:2 B1:2 I0:3 I1:3 W0:3 W1:3
rank 3: F1:0 F1:1 F1:2 F0:0 I0:0 W0:0 F0:1 F1:3&B0:1 F0:2&B1:0 B0:2 F0:3&B1:1 B0:3 I1:2 W1:2 I1:3 W1:3
"""

DUALPIPEV_P4_C8_TRACE = """\
rank 0: F0:0 F0:1 F0:2 F0:3 F0:4 F0:5 F0:6 F1:0 I1:0 W1:0 F1:1 I1:1 W1:1 F1:2 I1:2 W1:2 F1:3 F0:7&B1:3 F1:4&B0:0 B1:4 F1:5&B0:1 B1:5 F1:6&B0:2 B1:6 F1:7&B0:3 B1:7 I0:4 W0:4 I0:5 W0:5 I0:6 W0:6 I0:7 W0:7
rank 1: F0:0 F0:1 F0:2 F0:3 F0:4 F1:0 F0:5 F1:1 I1:0 W1:0 F1:2 I1:1 W1:1 F1:3 F0:6&B1:2 F1:4&B0:0 F0:7&B1:3 F1:5&B0:1 B1:4 F1:6&B0:2 B1:5 F1:7&B0:3 B1:6 B0:4 I1:7 I0:5 W1:7 I0:6 W0:5 I0:7 W0:6 W0:7
rank 2: F0:0 F0:1 F0:2 F1:0 F0:3 F1:1 F0:4 F1:2 I1:0 W1:0 F1:3 F0:5&B1:1 F1:4&B0:0 F0:6&B1:2 F1:5&B0:1 F0:7&B1:3 F1:6&B0:2 B1:4 F1:7&B0:3 B1:5 B0:4 B1:6 I0:5 I1:7 I0:6 W0:5 I0:7 W1:7 W0:6 W0:7
rank 3: F0:0 F1:0 F0:1 F1:1 F0:2 F1:2 F0:3 F1:3 F0:4 B1:0 F1:4&B0:0 F0:5&B1:1 F1:5&B0:1 F0:6&B1:2 F1:6&B0:2 F0:7&B1:3 F1:7&B0:3 B1:4 B0:4 B1:5 B0:5 I1:6 I0:6 I1:7 I0:7 W1:6 W0:6 W1:7 W0:7
"""


# --- DeepSeek's traced cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, trace", [("dualpipe", DUALPIPE_P4_C8_TRACE), ("dualpipev", DUALPIPEV_P4_C8_TRACE)], ids=["dualpipe", "dualpipev"]
)
def test_design_traced_case(name: str, trace: str) -> None:
    schedule = build_schedule(name, 4, 8)
    assert schedule.to_text() + "\n" == trace
    assert parse_ranks(trace) == [list(row) for row in schedule.actions]
    assert golden_path(name, 4, 8).read_text() == trace  # the golden agrees with the trace too


# --- golden files --------------------------------------------------------------------------------------

_REGEN = os.environ.get("DUALPIPE_REGEN_GOLDEN") == "1"


@pytest.mark.parametrize("case", golden_cases(), ids=lambda case: "{}_P{}_C{}".format(*case))
def test_golden(case: tuple[str, int, int]) -> None:
    path = golden_path(*case)
    text = render(*case)
    if _REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path.name} is missing; regenerate with: python tests/schedules/regen_golden.py"
    assert text == path.read_text(), (
        f"{case[0]} P={case[1]} C={case[2]} no longer matches {path.name} (checked against DeepSeek's reference "
        "for dualpipe/dualpipev). If the change is intended, run: python tests/schedules/regen_golden.py"
    )


def test_golden_directory_has_no_stale_files() -> None:
    expected = {golden_path(*case).name for case in golden_cases()}
    assert {path.name for path in GOLDEN_DIR.glob("*")} == expected
    # the reference's grid: dualpipe P in 2,4,6,8; dualpipev P in 1..5; C from 2P to 2P+6 and 20
    assert Counter(name for name, _, _ in golden_cases()) == {"dualpipe": 19, "dualpipev": 40, "1f1b": 6, "zb1p": 6}


# --- properties ------------------------------------------------------------------------------------------


def check_properties(schedule: Schedule) -> None:
    """Everything a correct schedule of any generator satisfies."""
    name, placement = schedule.name, schedule.placement
    per_flow = schedule.microbatches_per_flow()
    assert len(schedule.actions) == schedule.num_ranks
    for rank in range(schedule.num_ranks):
        ops = list(schedule.ops(rank))
        chunks = [chunk for chunk in range(placement.num_chunks) if placement.holds(rank, chunk)]
        position = {}
        for step, op in enumerate(ops):
            assert op not in position, f"rank {rank}: {op} twice"
            position[op] = step
        assert {op.chunk for op in ops} <= set(chunks)
        assert all(0 <= op.microbatch < per_flow for op in ops)

        by_kind: dict[tuple[OpKind, int], list[int]] = defaultdict(list)
        for op in ops:
            by_kind[(op.kind, op.chunk)].append(op.microbatch)
        for chunk in chunks:
            everything = list(range(per_flow))
            full, split, weight = (by_kind[(kind, chunk)] for kind in (OpKind.B, OpKind.I, OpKind.W))
            # each (chunk, micro-batch) gets one F and either one B or one I plus one W
            assert by_kind[(OpKind.F, chunk)] == everything, f"rank {rank} chunk {chunk}: forwards out of order"
            assert sorted(full + split) == everything
            assert sorted(weight) == sorted(split) and not set(full) & set(split)
            # per chunk the forwards, the backwards and the weight passes run in micro-batch order
            backwards = [op.microbatch for op in ops if op.chunk == chunk and op.kind.is_backward]
            assert backwards == everything, f"rank {rank} chunk {chunk}: backwards out of order"
            assert weight == sorted(weight), f"rank {rank} chunk {chunk}: weight passes out of order"

        for op, step in position.items():
            if op.kind is OpKind.W:  # every W after its I on the same rank
                assert position[Op(OpKind.I, op.chunk, op.microbatch)] < step
            if op.kind.is_backward:  # and every backward after its own forward
                assert position[Op(OpKind.F, op.chunk, op.microbatch)] < step

        kinds = {op.kind for op in ops}
        pairs = [action for action in schedule.actions[rank] if isinstance(action, Pair)]
        if name in ("dualpipe", "dualpipev"):
            for pair in pairs:  # only F&B pairs (never F&I), across the two chunks
                assert pair.forward.kind is OpKind.F and pair.backward.kind is OpKind.B
                assert pair.forward.chunk != pair.backward.chunk
        elif name == "1f1b":
            assert not pairs and kinds <= {OpKind.F, OpKind.B}
        elif name == "zb1p":
            assert not pairs and kinds <= {OpKind.F, OpKind.I, OpKind.W}
    validate(schedule)


def _grid() -> list[tuple[str, int, int]]:
    cases = []
    for p in range(1, 9):
        if p % 2 == 0:
            cases += [("dualpipe", p, c) for c in sorted({2 * p, 2 * p + 2, 3 * p + (3 * p) % 2, max(20, 2 * p)})]
        cases += [("dualpipev", p, c) for c in sorted({2 * p, 2 * p + 1, 2 * p + 5, 3 * p + 2})]
        for name in ("1f1b", "zb1p"):
            cases += [(name, p, c) for c in sorted({1, max(p - 1, 1), p, p + 1, 2 * p + 3})]
    return cases


@pytest.mark.parametrize("case", _grid(), ids=lambda case: "{}_P{}_C{}".format(*case))
def test_properties_grid(case: tuple[str, int, int]) -> None:
    check_properties(build_schedule(*case))


@st.composite
def _valid_case(draw: st.DrawFn) -> tuple[str, int, int]:
    name = draw(st.sampled_from(schedule_names()))
    if name == "dualpipe":
        p = 2 * draw(st.integers(1, 8))
        c = 2 * draw(st.integers(p, p + 12))
    elif name == "dualpipev":
        p = draw(st.integers(1, 16))
        c = draw(st.integers(2 * p, 2 * p + 24))
    else:
        p = draw(st.integers(1, 16))
        c = draw(st.integers(1, 3 * p + 8))
    return name, p, c


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_case())
def test_properties_random(case: tuple[str, int, int]) -> None:
    check_properties(build_schedule(*case))


def test_generators_are_deterministic() -> None:
    for name in schedule_names():
        assert build_schedule(name, 4, 12).to_text() == build_schedule(name, 4, 12).to_text()


def test_zb1p_differs_from_1f1b_only_by_the_split() -> None:
    """ZB1P keeps 1F1B's order of F and backward; only B becomes I and the W's are inserted."""
    for p, c in [(2, 5), (4, 4), (4, 11), (5, 2)]:
        plain, split = build_schedule("1f1b", p, c), build_schedule("zb1p", p, c)
        for rank in range(p):
            expected = [str(op) for op in plain.ops(rank)]
            assert [str(op).replace("I", "B") for op in split.ops(rank) if op.kind is not OpKind.W] == expected
