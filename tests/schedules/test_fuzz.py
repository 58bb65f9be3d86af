"""Property-based fuzzing of the simulator: random schedules, sizes and cost models give consistent figures.

(Generators x sizes are fuzzed for validity in test_generators.py; executed-for-real samples live in
tests/runtime/test_fuzz_runtime.py.)
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualpipe_plugin.schedules import CostModel, OpKind, Pair, build_schedule, simulate

_COST = st.floats(min_value=0.0, max_value=50.0, allow_nan=False, allow_infinity=False)


@st.composite
def _case(draw):
    name = draw(st.sampled_from(["dualpipe", "dualpipev", "1f1b", "zb1p"]))
    if name == "dualpipe":
        ranks = 2 * draw(st.integers(1, 8))
        microbatches = 2 * draw(st.integers(ranks, ranks + 6))
    elif name == "dualpipev":
        ranks = draw(st.integers(1, 16))
        microbatches = draw(st.integers(2 * ranks, 2 * ranks + 9))
    else:
        ranks = draw(st.integers(1, 16))
        microbatches = draw(st.integers(1, 3 * ranks + 5))
    backward = draw(_COST)
    weight = draw(st.floats(min_value=0.0, max_value=backward, allow_nan=False))
    forward = draw(_COST)
    costs = CostModel(F=forward, B=backward, W=weight, FB=draw(st.none() | _COST), comm=draw(st.floats(0.0, 5.0)))
    return build_schedule(name, ranks, microbatches), costs


def _duration(action, costs: CostModel) -> float:
    if isinstance(action, Pair):
        return costs.pair
    return {OpKind.F: costs.F, OpKind.B: costs.B, OpKind.I: costs.input_grad, OpKind.W: costs.W}[action.kind]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_simulated_figures_are_consistent(case):
    schedule, costs = case
    result = simulate(schedule, costs)
    tolerance = 1e-6 * max(1.0, result.makespan)
    assert all(idle >= -tolerance for idle in result.idle_per_rank)
    assert result.makespan >= max(result.busy_per_rank) - tolerance
    assert result.bubble >= -tolerance
    for rank, row in enumerate(result.spans):
        assert len(row) == len(schedule.actions[rank])
        busy = sum(_duration(action, costs) for action in schedule.actions[rank])
        assert abs(result.busy_per_rank[rank] - busy) <= tolerance
        for earlier, later in zip(row, row[1:]):
            assert later.start >= earlier.end - tolerance  # a rank runs one action at a time, in order
    # Critical path: micro-batch 0 crosses every stage forward, then every stage backward.
    placement = schedule.placement
    hops = sum(1 for route in placement.routes[:1] for a, b in zip(route, route[1:]) if a[0] != b[0])
    one_way = min(costs.F, costs.pair) * placement.num_stages + costs.comm * hops
    assert result.makespan >= one_way - tolerance
    # The simulation is a pure function of its inputs.
    assert simulate(schedule, costs).times == result.times
