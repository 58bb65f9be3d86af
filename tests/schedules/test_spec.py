"""ScheduleSpec: the one object that stands for a schedule outside schedules/ (placement, constraints)."""

from __future__ import annotations

import pytest

from dualpipe_plugin.schedules import SCHEDULES, ScheduleConfigError, get_schedule


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_spec_agrees_with_what_it_builds(name: str) -> None:
    spec = get_schedule(name)
    ranks = 2 if spec.constraints.even_ranks else 3
    least = spec.min_microbatches(ranks)
    schedule = spec.build(ranks, least)
    assert schedule.name == spec.name
    assert schedule.placement == spec.placement(ranks)
    assert spec.chunks_per_rank == schedule.placement.num_chunks
    assert spec.mirrored == schedule.placement.mirrored
    assert spec.num_stages(ranks) == schedule.placement.num_stages
    with pytest.raises(ScheduleConfigError):
        spec.build(ranks, least - 1)


def test_lookup_is_case_insensitive_and_accepts_a_spec() -> None:
    spec = get_schedule(" DualPipeV ")
    assert get_schedule(spec) is spec is SCHEDULES["dualpipev"]
    with pytest.raises(ScheduleConfigError, match="unknown pipeline schedule 3"):
        get_schedule(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name,ranks,microbatches,message", [
    ("dualpipe", 3, 8, "dualpipe needs an even number of pipeline ranks, got ranks=3: each rank pairs"),
    ("dualpipe", 4, 9, "dualpipe feeds half the micro-batches from each end, so their number must be even"),
    ("dualpipev", 4, 7, "dualpipev needs at least 2 x ranks = 8 micro-batches"),
    ("1f1b", 0, 4, "1f1b needs at least 1 pipeline rank"),
    ("zb1p", 2, 0, "zb1p needs at least 1 micro-batch"),
    ("1f1b", 2, True, "must be integers"),
])
def test_every_refusal_names_the_rule(name, ranks, microbatches, message) -> None:
    with pytest.raises(ScheduleConfigError, match=message):
        get_schedule(name).check(ranks, microbatches)


def test_pairs_and_placement_questions() -> None:
    assert {n for n, s in SCHEDULES.items() if s.runs_pairs} == {"dualpipe", "dualpipev"}
    assert {n for n, s in SCHEDULES.items() if s.chunks_per_rank == 2} >= {"dualpipe", "dualpipev"}
    placement = get_schedule("dualpipe").placement(4)
    assert placement.last_stage_ranks() == (0, 3)
    assert placement.holds_first_stage(0) and placement.holds_first_stage(3) and not placement.holds_first_stage(1)
    assert get_schedule("dualpipev").placement(4).last_stage_ranks() == (0,)
    assert get_schedule("1f1b").placement(4).last_stage_ranks() == (3,)
