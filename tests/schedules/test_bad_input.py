"""Bad input at the API: each raises a specific ``ValueError`` subclass whose message names the fix."""

from __future__ import annotations

import pytest

from dualpipe_plugin.schedules import (
    CostModel,
    CostModelError,
    ScheduleConfigError,
    ScheduleError,
    build_schedule,
    schedule_names,
    simulate,
)


def test_error_hierarchy() -> None:
    for error in (ScheduleConfigError, CostModelError):
        assert issubclass(error, ScheduleError) and issubclass(error, ValueError)


@pytest.mark.parametrize(
    "name, ranks, microbatches, needles",
    [
        ("dualpipe", 3, 8, ["even number of pipeline ranks", "ranks=3", "use an even pipeline size or the 'dualpipev'"]),
        ("dualpipe", 5, 20, ["even number of pipeline ranks", "'dualpipev'"]),
        ("dualpipe", 4, 9, ["must be even", "microbatches=9", "use 10"]),
        ("dualpipe", 4, 6, ["at least 2 x ranks = 8 micro-batches", "microbatches=6", "raise the micro-batch count"]),
        ("dualpipe", 2, 2, ["at least 2 x ranks = 4"]),
        ("dualpipev", 3, 5, ["dualpipev needs at least 2 x ranks = 6", "microbatches=5", "raise the micro-batch count"]),
        ("dualpipev", 1, 1, ["at least 2 x ranks = 2"]),
        ("dualpipe", 0, 8, ["at least 1 pipeline rank", "ranks=0"]),
        ("dualpipev", 0, 4, ["at least 1 pipeline rank", "ranks=0"]),
        ("dualpipev", -3, 4, ["at least 1 pipeline rank", "ranks=-3"]),
        ("1f1b", 0, 4, ["1f1b needs at least 1 pipeline rank"]),
        ("zb1p", -1, 4, ["zb1p needs at least 1 pipeline rank"]),
        ("1f1b", 4, 0, ["1f1b needs at least 1 micro-batch", "microbatches=0"]),
        ("zb1p", 2, -2, ["zb1p needs at least 1 micro-batch"]),
        ("dualpipe", 4.0, 8, ["must be integers", "ranks=4.0"]),
        ("dualpipev", 4, "8", ["must be integers", "microbatches='8'"]),
    ],
)
def test_schedule_config_errors(name: str, ranks, microbatches, needles: list[str]) -> None:
    with pytest.raises(ScheduleConfigError) as info:
        build_schedule(name, ranks, microbatches)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("name", ["gpipe", "dualpipe-v", "", "interleaved"])
def test_unknown_schedule_lists_valid_ones(name: str) -> None:
    with pytest.raises(ScheduleConfigError) as info:
        build_schedule(name, 4, 8)
    message = str(info.value)
    assert f"unknown pipeline schedule {name!r}" in message
    assert "valid schedules: dualpipe, dualpipev, 1f1b, zb1p, zbv" in message
    assert set(schedule_names()) == {"dualpipe", "dualpipev", "1f1b", "zb1p", "zbv"}


def test_schedule_name_not_a_string() -> None:
    with pytest.raises(ScheduleConfigError, match="valid schedules"):
        build_schedule(None, 4, 8)  # type: ignore[arg-type]


def test_schedule_names_are_case_insensitive() -> None:
    assert build_schedule("DualPipeV", 2, 4).to_text() == build_schedule("dualpipev", 2, 4).to_text()


def test_the_reference_accepts_what_we_accept() -> None:
    """The edges of the accepted range build: P=1 and odd C for dualpipev, C=2P for both."""
    build_schedule("dualpipev", 1, 2)
    build_schedule("dualpipev", 3, 7)
    build_schedule("dualpipe", 2, 4)
    build_schedule("1f1b", 4, 1)


# --- costs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(F=-1), ["cost F=-1 is negative", "every cost must be >= 0"]),
        (dict(W=-0.5), ["cost W=-0.5 is negative", ">= 0"]),
        (dict(comm=-1), ["cost comm=-1 is negative"]),
        (dict(FB=-3), ["cost FB=-3 is negative"]),
        (dict(I=-1), ["cost I=-1 is negative"]),
        (dict(F=None), ["cost F is missing", "give a number >= 0", "F=1"]),
        (dict(B=None), ["cost B is missing", "B=2"]),
        (dict(W=None), ["cost W is missing", "W=1"]),
        (dict(comm=None), ["cost comm is missing", "comm=0"]),
        (dict(F=float("nan")), ["not a finite number"]),
        (dict(B=float("inf")), ["not a finite number"]),
        (dict(F="1"), ["cost F='1' is not a finite number"]),
        (dict(B=1, W=2), ["W=2 exceeds B=1", "use W <= B"]),
        (dict(stage_scale=(1.0, -1.0)), ["stage_scale", "negative entry"]),
        (dict(F=1e308, B=1e308, W=1), ["F=1e+308 and B=1e+308 add up to inf", "express the costs in a larger unit"]),
    ],
)
def test_cost_model_errors(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(CostModelError) as info:
        CostModel(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_optional_costs_default_from_the_others() -> None:
    costs = CostModel(F=1, B=3, W=1)
    assert costs.input_grad == 2 and costs.pair == 4
    assert CostModel(F=1, B=3, W=1, I=1.5, FB=3.5).input_grad == 1.5


@pytest.mark.parametrize(
    "text, needles",
    [
        ("", ["empty cost string", "give for example 'F=1,B=2,W=1'"]),
        (" , ", ["empty cost string"]),
        ("F1", ["cannot parse cost 'F1'", "expected KEY=NUMBER with KEY one of F, B, I, W, FB, comm", "'F=1,B=2,W=1,FB=3'"]),
        ("F=1,X=2", ["cannot parse cost 'X=2'", "KEY one of F, B, I, W, FB, comm"]),
        ("f=1", ["cannot parse cost 'f=1'"]),
        ("F=abc", ["cost F='abc' is not a number", "write F=NUMBER"]),
        ("F=", ["cost F is missing its value", "write F=NUMBER"]),
        ("F=1,B=", ["cost B is missing its value", "write B=NUMBER"]),
        ("F=1,F=2", ["cost F is given twice", "give each key once"]),
        ("F=-1", ["cost F=-1.0 is negative", ">= 0"]),
        ("B=1,W=3", ["exceeds B", "use W <= B"]),
    ],
)
def test_cost_string_errors(text: str, needles: list[str]) -> None:
    with pytest.raises(CostModelError) as info:
        CostModel.parse(text)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_cost_string_parses() -> None:
    costs = CostModel.parse(" F=1, B=2,I=1 ,W=1,FB=3,comm=0.25 ")
    assert costs == CostModel(F=1, B=2, I=1, W=1, FB=3, comm=0.25)


def test_stage_scale_shorter_than_the_stages() -> None:
    with pytest.raises(CostModelError, match="stage_scale has 3 entries but the schedule has a stage 3"):
        simulate(build_schedule("1f1b", 4, 4), CostModel(stage_scale=(1.0, 1.0, 1.0)))
