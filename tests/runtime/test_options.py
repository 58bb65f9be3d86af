"""PipelineOptions: one object, one set of defaults, every bad value refused at the door naming the key."""

from __future__ import annotations

import math

import pytest

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.options import DEFAULT_TIMEOUT_S, PipelineOptions
from dualpipe_plugin.schedules import get_schedule


def test_defaults_live_in_one_place() -> None:
    options = PipelineOptions(schedule=get_schedule("dualpipev"))
    assert (options.overlap, options.split_weights, options.timeout_s, options.shapes_per_microbatch,
            options.loss_reduction, options.detect_nonfinite) == (None, True, DEFAULT_TIMEOUT_S, False, "mean", False)
    assert PipelineOptions.from_values({"schedule": "DualPipeV"}) == options


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf, True, "30"])
def test_timeout_must_be_positive_and_finite(timeout) -> None:
    with pytest.raises(PipelineConfigError, match=r"timeout_s must be a positive, finite number of seconds"):
        PipelineOptions(schedule=get_schedule("1f1b"), timeout_s=timeout)


@pytest.mark.parametrize("field,value,message", [
    ("overlap", "yes", "overlap must be true or false"),
    ("split_weights", 1, "split_weights must be true or false"),
    ("shapes_per_microbatch", None, "shapes_per_microbatch must be true or false"),
    ("loss_reduction", "avg", "loss_reduction must be 'mean' or 'sum'"),
])
def test_bad_values_name_the_key(field, value, message) -> None:
    with pytest.raises(PipelineConfigError, match=message):
        PipelineOptions.from_values({"schedule": "zb1p", field: value})


def test_the_caller_spells_the_key_and_picks_the_error() -> None:
    class ConfigError(ValueError):
        pass

    with pytest.raises(ConfigError, match=r"^pipeline\.timeout_s must be"):
        PipelineOptions.from_values({"schedule": "zb1p", "timeout_s": -5}, spell=lambda f: f"pipeline.{f}",
                                    error=ConfigError)
    with pytest.raises(ConfigError, match=r"^--pipeline-schedule: unknown pipeline schedule 'gpipe'; valid"):
        PipelineOptions.from_values({"schedule": "gpipe"}, spell=lambda f: "--pipeline-schedule", error=ConfigError)


def test_schedule_is_required_and_unknown_fields_are_refused() -> None:
    with pytest.raises(PipelineConfigError, match="schedule is required"):
        PipelineOptions.from_values({})
    with pytest.raises(TypeError, match="no field"):
        PipelineOptions.from_values({"schedule": "zb1p", "timeout": 3})
    with pytest.raises(PipelineConfigError, match="must be a ScheduleSpec"):
        PipelineOptions(schedule="dualpipev")


def test_frozen_and_replace_checks_again() -> None:
    options = PipelineOptions(schedule=get_schedule("zb1p"))
    with pytest.raises(AttributeError):
        options.timeout_s = 3  # type: ignore[misc]
    assert options.replace(timeout_s=3).timeout_s == 3
    with pytest.raises(PipelineConfigError):
        options.replace(timeout_s=0)
