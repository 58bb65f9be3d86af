"""The simulator: DeepSeek's bubble table at unit costs, self-consistent figures, comm and stage scaling,
and the two renderers (Chrome trace, PNG timeline)."""

from __future__ import annotations

import json
import math

import pytest

from dualpipe_plugin.schedules import CostModel, CostModelError, Pair, build_schedule, lower, simulate
from dualpipe_plugin.schedules.render import chrome_trace, write_chrome_trace, write_timeline, write_timeline_png

# The cost ratios of DeepSeek's bubble table: F=1, B=2, W=1, F&B=3, I=B-W.
F, B, W, FB = 1.0, 2.0, 1.0, 3.0
UNIT = CostModel(F=F, B=B, W=W, I=B - W, FB=FB)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- DeepSeek's bubble table ---------------------------------------------------------------------------


def _expected_idle(name: str, p: int) -> float:
    if name == "1f1b":
        return (p - 1) * (F + B)
    if name == "zb1p":
        return (p - 1) * (F + B - 2 * W)
    if name == "dualpipe":
        return (p / 2 - 1) * (FB + B - 3 * W)
    # DualPipeV is DualPipe over PP = 2P stages folded onto P ranks: (PP/2 - 1) = (P - 1)
    return (p - 1) * (FB + B - 3 * W)


_FORMULA_CASES = (
    [("1f1b", p, c) for p in (1, 2, 3, 4, 8) for c in (p, 2 * p + 1, 24)]
    + [("zb1p", p, c) for p in (1, 2, 3, 4, 8) for c in (p, 2 * p + 1, 24)]
    + [("dualpipe", p, c) for p in (2, 4, 6, 8) for c in (2 * p, 2 * p + 2, 2 * p + 6, 20) if c >= 2 * p]
    + [("dualpipev", p, c) for p in (1, 2, 3, 4, 5, 8) for c in (2 * p, 2 * p + 1, 2 * p + 6, 20) if c >= 2 * p]
)


@pytest.mark.parametrize("case", _FORMULA_CASES, ids=lambda case: "{}_P{}_C{}".format(*case))
def test_unit_cost_idle_equals_bubble_table(case: tuple[str, int, int]) -> None:
    name, p, c = case
    result = simulate(build_schedule(name, p, c), UNIT)
    expected = _expected_idle(name, p)
    assert result.idle_per_rank == pytest.approx([expected] * p)
    assert result.bubble == pytest.approx(expected)


@pytest.mark.parametrize("case", _FORMULA_CASES, ids=lambda case: "{}_P{}_C{}".format(*case))
def test_peak_activations(case: tuple[str, int, int]) -> None:
    name, p, c = case
    peaks = simulate(build_schedule(name, p, c), UNIT).peak_activations_per_rank
    if name == "dualpipe":
        assert peaks == (p + 1,) * p
    elif name == "dualpipev":  # 2P+1 chunks = PP+1 with PP = 2P stages, each chunk half a DualPipe stage
        assert peaks == (2 * p + 1,) * p
    elif name == "1f1b":  # rank r holds at most P-r (bounded by C)
        assert peaks == tuple(min(p - rank, c) for rank in range(p))
        assert peaks[0] == min(p, c)
    else:  # zb1p: P on every rank (the deferred W keeps the activation alive)
        assert peaks == (min(p, c),) * p


def test_default_costs_are_the_unit_model() -> None:
    schedule = build_schedule("dualpipe", 4, 8)
    assert simulate(schedule).to_dict() == simulate(schedule, UNIT).to_dict()


# --- self-consistency ----------------------------------------------------------------------------------

_GRID = [
    ("1f1b", 1, 3), ("1f1b", 4, 2), ("1f1b", 4, 9), ("zb1p", 3, 7), ("zb1p", 5, 5),
    ("dualpipe", 2, 4), ("dualpipe", 4, 10), ("dualpipe", 6, 20),
    ("dualpipev", 1, 2), ("dualpipev", 3, 7), ("dualpipev", 5, 13),
]  # fmt: skip
_COSTS = [UNIT, CostModel(F=1.3, B=2.1, W=0.7, FB=2.5, comm=0.2), CostModel(F=1, B=1, W=0, comm=1.5)]


def _op_stage(schedule, rank: int, op) -> int:
    return schedule.placement.stage(rank, op.chunk)


@pytest.mark.parametrize("costs", _COSTS, ids=["unit", "uneven", "no-W"])
@pytest.mark.parametrize("case", _GRID, ids=lambda case: "{}_P{}_C{}".format(*case))
def test_figures_consistent(case: tuple[str, int, int], costs: CostModel) -> None:
    schedule = build_schedule(*case)
    result = simulate(schedule, costs)
    assert len(result.busy_per_rank) == len(result.idle_per_rank) == schedule.num_ranks
    for rank in range(schedule.num_ranks):
        row = result.times[rank]
        assert len(row) == len(schedule.actions[rank])
        # every action lasts its cost, and a rank runs one action at a time, in order
        for action, (start, end) in zip(schedule.actions[rank], row):
            stages = tuple(_op_stage(schedule, rank, op) for op in action.ops())
            assert end - start == pytest.approx(costs.action_cost(action, stages))
            assert start >= 0
        assert all(row[i][1] <= row[i + 1][0] + 1e-9 for i in range(len(row) - 1))
        busy = result.busy_per_rank[rank]
        assert busy == pytest.approx(sum(end - start for start, end in row))
        assert result.makespan >= busy - 1e-9
        assert result.idle_per_rank[rank] == pytest.approx(result.makespan - busy)
        assert result.idle_per_rank[rank] >= -1e-9
    assert result.makespan == pytest.approx(max(row[-1][1] for row in result.times))
    assert result.bubble == pytest.approx(result.makespan - max(result.busy_per_rank))
    assert 0 <= result.bubble_fraction < 1
    spans = result.spans
    assert [len(row) for row in spans] == [len(row) for row in schedule.actions]
    assert spans[0][0].action == schedule.actions[0][0] and spans[0][0].step == 0


@pytest.mark.parametrize("costs", _COSTS, ids=["unit", "uneven", "no-W"])
@pytest.mark.parametrize("case", _GRID, ids=lambda case: "{}_P{}_C{}".format(*case))
def test_simulated_times_respect_dependencies(case: tuple[str, int, int], costs: CostModel) -> None:
    """Each op starts after what it needs has finished, plus ``comm`` when that came from another rank."""
    schedule = build_schedule(*case)
    result = simulate(schedule, costs)
    lowered = lower(schedule)
    produced = {}  # event -> (end, rank)
    started = []  # (event needs, start, rank)
    for rank in range(schedule.num_ranks):
        ops = iter(lowered[rank])
        for action, (start, end) in zip(schedule.actions[rank], result.times[rank]):
            for _ in action.ops():
                op, io = next(ops)
                produced[io.produces] = (end, rank)
                started.append((io.needs, start, rank))
    for needs, start, rank in started:
        for need in needs:
            end, where = produced[need]
            assert start >= end + (costs.comm if where != rank else 0.0) - 1e-9


@pytest.mark.parametrize("case", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 3, 7), ("dualpipev", 1, 2)])
def test_comm_latency_increases_makespan_monotonically(case: tuple[str, int, int]) -> None:
    schedule = build_schedule(*case)
    makespans = [simulate(schedule, CostModel(comm=comm)).makespan for comm in (0.0, 0.05, 0.1, 0.5, 1.0, 3.0)]
    assert makespans == sorted(makespans)
    if schedule.num_ranks > 1:
        assert makespans[-1] > makespans[0]
    else:  # one rank: every hand-over is local, so latency costs nothing
        assert makespans[-1] == makespans[0]


def test_comm_latency_two_stage_1f1b_exact() -> None:
    # rank 1 waits comm for its first activation; rank 0 waits comm for the last gradient: 2 comm in total
    schedule = build_schedule("1f1b", 2, 1)
    assert simulate(schedule, CostModel(comm=0.25)).makespan == pytest.approx(2 * (F + B) + 2 * 0.25)


def test_stage_scale_uniform_scales_makespan() -> None:
    schedule = build_schedule("dualpipev", 3, 8)  # 6 stages
    base = simulate(schedule, UNIT)
    doubled = simulate(schedule, CostModel(F=F, B=B, W=W, I=B - W, FB=FB, stage_scale=(2.0,) * 6))
    assert doubled.makespan == pytest.approx(2 * base.makespan)
    assert doubled.idle_per_rank == pytest.approx([2 * idle for idle in base.idle_per_rank])


def test_stage_scale_heavier_last_stage() -> None:
    schedule = build_schedule("1f1b", 4, 8)
    base = simulate(schedule, UNIT)
    heavy = simulate(schedule, CostModel(stage_scale=(1.0, 1.0, 1.0, 2.0)))
    assert heavy.busy_per_rank[:3] == pytest.approx(base.busy_per_rank[:3])
    assert heavy.busy_per_rank[3] == pytest.approx(8 * 2 * (F + B))
    assert heavy.makespan > base.makespan
    assert heavy.makespan >= heavy.busy_per_rank[3]


def test_stage_scale_pair_averages_its_two_stages() -> None:
    costs = CostModel(FB=3.0, stage_scale=(1.0, 3.0))
    pair = build_schedule("dualpipe", 2, 4).actions[0][4]
    assert isinstance(pair, Pair)
    assert costs.action_cost(pair, (0, 1)) == pytest.approx(3.0 * (1.0 + 3.0) / 2)


def test_stage_scale_too_short_is_an_error() -> None:
    with pytest.raises(CostModelError, match="one entry per pipeline stage"):
        simulate(build_schedule("dualpipev", 2, 4), CostModel(stage_scale=(1.0, 1.0)))


def test_non_unit_ratios_are_not_the_formula() -> None:
    """With W=0.5 the table's formula is not exact; the simulator still gives sane, positive figures."""
    result = simulate(build_schedule("dualpipe", 8, 20), CostModel(F=1, B=2, W=0.5, FB=3))
    assert all(idle > 0 for idle in result.idle_per_rank)
    assert not math.isclose(result.bubble, (8 / 2 - 1) * (3 + 2 - 3 * 0.5))


def test_to_dict_keys() -> None:
    figures = simulate(build_schedule("zb1p", 3, 6)).to_dict()
    assert {"makespan", "bubble", "bubble_fraction", "idle_per_rank", "busy_per_rank", "peak_activations_per_rank"} <= set(figures)
    json.dumps(figures)  # plain JSON types


# --- renderers -----------------------------------------------------------------------------------------


def test_chrome_trace_structure(tmp_path) -> None:
    schedule = build_schedule("dualpipe", 4, 8)
    result = simulate(schedule, UNIT)
    path = write_chrome_trace(result.timed_rows(), tmp_path / "sub" / "trace.json", "dualpipe P=4")
    document = json.loads(path.read_text())
    assert document == chrome_trace(result.timed_rows(), "dualpipe P=4")
    events = document["traceEvents"]
    threads = {event["tid"]: event["args"]["name"] for event in events if event.get("name") == "thread_name"}
    assert threads == {rank: f"rank {rank}" for rank in range(4)}  # one thread per rank
    complete = [event for event in events if event["ph"] == "X"]
    assert len(complete) == sum(len(row) for row in schedule.actions)  # one event per action
    for rank in range(4):
        mine = [event for event in complete if event["tid"] == rank]
        assert [event["name"] for event in mine] == [str(action) for action in schedule.actions[rank]]
        for event, (start, end) in zip(mine, result.times[rank]):
            assert event["pid"] == 0 and event["cat"] in {"F", "B", "I", "W", "F&B"}
            assert event["ts"] == pytest.approx(start * 1000) and event["dur"] == pytest.approx((end - start) * 1000)
    assert {event["cat"] for event in complete} == {"F", "B", "I", "W", "F&B"}


def test_png_timeline_is_a_png(tmp_path) -> None:
    result = simulate(build_schedule("dualpipev", 3, 7), UNIT)
    path = write_timeline_png(result.timed_rows(), tmp_path / "timeline.png", "dualpipev")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_write_timeline_picks_the_format_by_suffix(tmp_path) -> None:
    rows = simulate(build_schedule("1f1b", 2, 3), UNIT).timed_rows()
    assert json.loads(write_timeline(rows, tmp_path / "t.json").read_text())["traceEvents"]
    assert write_timeline(rows, tmp_path / "t.PNG").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match=r"name it \*\.png .* or \*\.json"):
        write_timeline(rows, tmp_path / "t.svg")
