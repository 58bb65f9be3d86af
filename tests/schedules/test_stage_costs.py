"""Per-stage costs: the simulator with a StageCostModel (per-stage op costs, latency + bytes/bandwidth per
hop, per-action overhead), and the frozen timing graph the cut search evaluates it with."""

from __future__ import annotations

import random

import pytest

from dualpipe_plugin.schedules import CostModel, CostModelError, Pair, build_schedule, schedule_names, simulate
from dualpipe_plugin.schedules.stage_costs import Link, StageCost, StageCostModel
from dualpipe_plugin.schedules.timing_graph import TimingGraph

SIZES = {"dualpipe": (4, 12), "dualpipev": (4, 9), "1f1b": (4, 9), "zb1p": (3, 7), "zbv": (2, 6)}


def _uniform(schedule, F=1.0, B=2.0, W=1.0, **kwargs) -> StageCostModel:
    stage = StageCost(F=F, I=B - W, W=W, B=B)
    return StageCostModel(stages=(stage,) * schedule.placement.num_stages, **kwargs)


@pytest.mark.parametrize("name", schedule_names())
def test_equal_stages_and_one_latency_give_the_uniform_models_figures(name):
    """Equal to the uniform model, except that F&B pairs run half by half (StageCostModel.forward_half), as
    the runtime runs them: the forward half needs only its inputs and hands its outputs on when it ends, so
    a schedule with pairs can only get shorter than DeepSeek's accounting of a pair as one block."""
    schedule = build_schedule(name, *SIZES[name])
    has_pairs = any(isinstance(action, Pair) for row in schedule.actions for action in row)
    for comm in (0.0, 0.37):
        old = simulate(schedule, CostModel(F=1, B=2, W=1, comm=comm))
        new = simulate(schedule, _uniform(schedule, link=Link(latency=comm)))
        if has_pairs:
            assert new.makespan <= old.makespan + 1e-9
        else:
            assert new.makespan == pytest.approx(old.makespan)
            assert new.idle_per_rank == pytest.approx(old.idle_per_rank)


def test_a_pair_runs_half_by_half_as_the_runtime_runs_it():
    """dualpipev P=2 C=4 with a hop: the pairs' forward outputs leave after their forward half, and the
    forward half starts before the backward's gradient is in, so the step beats the one-block pair; an
    overlapped pair (pair_factor < 1) stays one block."""
    schedule = build_schedule("dualpipev", 2, 4)
    one_block = simulate(schedule, CostModel(F=1, B=2, W=1, comm=0.5)).makespan
    assert simulate(schedule, _uniform(schedule, link=Link(latency=0.5))).makespan < one_block - 0.4
    overlapped = _uniform(schedule, link=Link(latency=0.5), pair_factor=0.999999)
    assert simulate(schedule, overlapped).makespan == pytest.approx(one_block, rel=1e-5)


def test_a_hop_costs_latency_plus_bytes_over_bandwidth_on_its_own_boundary():
    # 1F1B, P=2, C=1: F0 | hop | F1 B1 | hop | B0 ; the one boundary carries 2e6 bytes at 1e6 bytes/ms.
    schedule = build_schedule("1f1b", 2, 1)
    costs = StageCostModel(stages=(StageCost(F=1, I=2, W=1), StageCost(F=3, I=4, W=1)), boundary_bytes=(2e6,),
                           link=Link(latency=0.5, bytes_per_ms=1e6))
    hop = 0.5 + 2.0
    assert simulate(schedule, costs).makespan == pytest.approx(1 + hop + 3 + 5 + hop + 3)


def test_every_action_pays_the_overhead_once():
    schedule = build_schedule("1f1b", 1, 3)  # F B F B F B on one rank
    costs = _uniform(schedule, overhead=0.25)
    assert simulate(schedule, costs).makespan == pytest.approx(3 * (1 + 2) + 6 * 0.25)


def test_pair_factor_scales_an_overlapped_pair():
    schedule = build_schedule("dualpipev", 2, 8)
    pairs = sum(1 for a in schedule.actions[0] if "&" in str(a))
    assert pairs > 0
    plain = simulate(schedule, _uniform(schedule)).busy_per_rank[0]
    faster = simulate(schedule, _uniform(schedule, pair_factor=0.5)).busy_per_rank[0]
    assert plain - faster == pytest.approx(pairs * 0.5 * 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stages=()), "needs at least one stage"),
    (dict(stages=(StageCost(F=1, I=1, W=1),) * 3, boundary_bytes=(1.0,)), "3 stages have 2 boundaries, got 1"),
    (dict(stages=(StageCost(F=1, I=1, W=1),), overhead=-1), "overhead=-1 is negative"),
])
def test_bad_stage_cost_models_name_the_fix(kwargs, match):
    with pytest.raises(CostModelError, match=match):
        StageCostModel(**kwargs)


def test_bad_link_and_stage_values():
    with pytest.raises(CostModelError, match="bandwidth is 0 bytes/ms"):
        Link(bytes_per_ms=0)
    with pytest.raises(CostModelError, match="F=nan is not a finite number"):
        StageCost(F=float("nan"), I=1, W=1)
    schedule = build_schedule("dualpipev", 2, 4)
    too_few = StageCostModel(stages=(StageCost(F=1, I=1, W=1),) * 2)
    with pytest.raises(CostModelError, match=r"the cost model has 2 stages but the schedule has a stage [23]; profile or cut"):
        simulate(schedule, too_few)


@pytest.mark.parametrize("pair_factor", [0.9, 1.0], ids=["overlapped", "sequential"])
@pytest.mark.parametrize("name", schedule_names())
def test_timing_graph_equals_the_simulator_on_random_costs(name, pair_factor):
    rng = random.Random(7)
    schedule = build_schedule(name, *SIZES[name])
    graph = TimingGraph(schedule)
    num_stages = schedule.placement.num_stages
    for _ in range(5):
        stages = tuple(StageCost(F=rng.uniform(0.5, 3), I=rng.uniform(0.5, 3), W=rng.uniform(0, 2),
                                 B=rng.uniform(1, 6)) for _ in range(num_stages))
        model = StageCostModel(stages=stages, boundary_bytes=tuple(rng.uniform(0, 1e6) for _ in range(num_stages - 1)),
                               link=Link(latency=0.2, bytes_per_ms=1e6), overhead=0.1, pair_factor=pair_factor)
        expected = simulate(schedule, model).makespan
        got = graph.makespan([s.F for s in stages], [s.I for s in stages], [s.W for s in stages],
                             [s.backward for s in stages], [model.boundary_time(b) for b in range(num_stages - 1)],
                             overhead=0.1, pair_factor=pair_factor)
        assert got == pytest.approx(expected, rel=1e-12)


def test_timing_graph_busy_work_is_what_the_simulator_keeps_each_rank_busy():
    schedule = build_schedule("zbv", 2, 6)
    graph = TimingGraph(schedule)
    stages = [StageCost(F=1 + s, I=2, W=0.5 * s, B=3) for s in range(4)]
    result = simulate(schedule, StageCostModel(stages=tuple(stages)))
    for rank in range(2):
        busy = sum(graph.stage_work(rank, s, c.F, c.I, c.W, c.backward) for s, c in enumerate(stages))
        assert busy == pytest.approx(result.busy_per_rank[rank])
