"""The cut search: exact against brute force, the V's heavy ends, the memory cap, the node budget."""

from __future__ import annotations

import itertools
import random

import pytest

from dualpipe_plugin.schedules import CostModelError, build_schedule, simulate
from dualpipe_plugin.schedules.cuts import StageSlicer, Unit, search_cuts, uniform_bounds
from dualpipe_plugin.schedules.memory import estimate_memory
from dualpipe_plugin.schedules.stage_costs import Link

LINK = Link(latency=0.3, bytes_per_ms=1e5)


def _random_units(rng: random.Random, count: int) -> list[Unit]:
    return [Unit(F=rng.uniform(1, 5), I=rng.uniform(1, 5), W=rng.uniform(0, 3), B=rng.uniform(2, 9),
                 activation=rng.uniform(1, 10), saves_input=rng.uniform(0, 1), saves_output=rng.uniform(0, 1),
                 w_store=rng.uniform(0, 5), output=rng.uniform(0, 1e5), params=rng.uniform(0, 100))
            for _ in range(count)]


def _brute_force(schedule, units, cap):
    slicer = StageSlicer(units)
    stages = schedule.placement.num_stages
    best = None
    for cuts in itertools.combinations(range(1, len(units)), stages - 1):
        bounds = (0, *cuts, len(units))
        memory = estimate_memory(schedule, slicer.memory(bounds), boundary_bytes=slicer.boundary_bytes(bounds))
        if cap is not None and max(m.total for m in memory) > cap:
            continue
        time = simulate(schedule, slicer.cost_model(bounds, link=LINK, overhead=0.1)).makespan
        best = time if best is None else min(best, time)
    return best


CASES = [(name, ranks, extra) for name, ranks in (("1f1b", 4), ("zb1p", 2), ("dualpipev", 2), ("dualpipev", 4),
                                                  ("zbv", 2), ("dualpipe", 4)) for extra in (0, 3)]


@pytest.mark.parametrize("name, ranks, extra", CASES)
def test_the_search_finds_the_brute_force_optimum(name, ranks, extra):
    rng = random.Random(f"{name}-{ranks}-{extra}")
    schedule = build_schedule(name, ranks, 4 * ranks)
    units = _random_units(rng, schedule.placement.num_stages + extra)
    for cap_share in (None, 0.5):
        cap = None
        if cap_share is not None:  # a cap that rules out about half of the cuts
            slicer = StageSlicer(units)
            stages = schedule.placement.num_stages
            totals = sorted(
                max(m.total for m in estimate_memory(schedule, slicer.memory(b), boundary_bytes=slicer.boundary_bytes(b)))
                for b in ((0, *c, len(units)) for c in itertools.combinations(range(1, len(units)), stages - 1)))
            cap = totals[len(totals) // 2]
        found = search_cuts(schedule, units, link=LINK, overhead=0.1, memory_cap=cap, tolerance=0)
        assert found.proven_optimal
        assert found.step_time == pytest.approx(_brute_force(schedule, units, cap), rel=1e-12)
        if cap is not None:
            assert max(m.total for m in found.memory) <= cap


def test_heavy_ends_get_stages_of_their_own_in_a_v():
    light = Unit(F=1, I=1, W=1, B=2)
    heavy = Unit(F=3, I=3, W=3, B=6)
    units = [heavy] + [light] * 14 + [heavy]
    schedule = build_schedule("dualpipev", 4, 16)
    uniform = simulate(schedule, StageSlicer(units).cost_model(uniform_bounds(16, 8), link=Link())).makespan
    found = search_cuts(schedule, units)
    assert found.bounds[:2] == (0, 1) and found.bounds[-2:] == (15, 16)  # rank 0 keeps only the two ends
    assert found.step_time < 0.85 * uniform


def test_no_cut_under_the_cap_gives_none_and_a_budget_says_not_proven():
    units = [Unit(F=1, I=1, W=1, B=2, params=100)] * 6
    schedule = build_schedule("1f1b", 2, 4)
    assert search_cuts(schedule, units, memory_cap=150) is None
    rng = random.Random(1)
    big = _random_units(rng, 24)
    result = search_cuts(build_schedule("dualpipev", 4, 16), big, max_nodes=5)
    assert result is not None and not result.proven_optimal and result.nodes == 5


def test_a_slice_sums_its_units_and_counts_shared_saves_once():
    units = [Unit(F=1, I=2, W=3, B=5, activation=10, saves_input=4, saves_output=6, output=7, params=1),
             Unit(F=1, I=2, W=3, B=5, activation=10, saves_input=5, saves_output=6, output=8, params=1)]
    slicer = StageSlicer(units)
    assert slicer.activation(0, 2) == 20 - 5  # the second saves the first's output (min(6, 5) shared)
    cost = slicer.stage_cost(0, 2)
    assert (cost.F, cost.I, cost.W, cost.backward) == (2, 4, 6, 10)
    assert slicer.boundary_bytes((0, 1, 2)) == (7,)
    with_overhead = StageSlicer(units, overhead=(0.1, 0.2, 0.3, 0.4)).stage_cost(0, 2)  # once per action
    assert (with_overhead.F, with_overhead.I, with_overhead.W, with_overhead.backward) == (2.1, 4.2, 6.3, 10.4)
    assert uniform_bounds(7, 3) == (0, 3, 5, 7)


def test_too_few_units_and_a_bad_tolerance_are_refused():
    with pytest.raises(CostModelError, match="cuts the model into 8 stages but the profile has 4 cuttable units"):
        search_cuts(build_schedule("dualpipev", 4, 8), [Unit(F=1, I=1, W=1, B=2)] * 4)
    with pytest.raises(CostModelError, match="tolerance=1 must be in"):
        search_cuts(build_schedule("1f1b", 1, 1), [Unit(F=1, I=1, W=1, B=2)], tolerance=1)
