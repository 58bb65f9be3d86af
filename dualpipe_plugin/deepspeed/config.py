"""The ``"pipeline"`` section of a DeepSpeed config, as this adapter reads it, and its checks.

DeepSpeed copies the JSON ``"pipeline"`` dict verbatim into ``DeepSpeedConfig.pipeline``, so the keys
below sit next to DeepSpeed's own (``activation_checkpoint_interval``, ``use_reentrant``, ...)::

    "pipeline": {
        "schedule": "dualpipev",      # dualpipe | dualpipev | 1f1b | zb1p | deepspeed (the default)
        "overlap": true,              # F&B pairs through the overlap engine where the layers support it (default false)
        "split_weights": true,        # the B/W split (zero-bubble W passes); false runs every backward whole
        "timeout_s": 300,             # every pipeline communication wait
        "partition_method": "uniform" # only needed if the PipelineModule was built before the import
    }

Every check runs in ``deepspeed.initialize``, before the model is re-partitioned or the optimizer is
built, and fails with a :class:`DeepSpeedPipelineConfigError` (a ``ValueError``) that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dualpipe_plugin.schedules import ScheduleConfigError, build_schedule, schedule_names

__all__ = [
    "DEEPSPEED_SCHEDULE", "DeepSpeedPipelineConfigError", "PipelineOptions", "check_engine_setup", "read_pipeline_options",
]

DEEPSPEED_SCHEDULE = "deepspeed"
"""``"schedule": "deepspeed"`` (or no ``"schedule"`` key) keeps DeepSpeed's own TrainSchedule."""


class DeepSpeedPipelineConfigError(ValueError):
    """The DeepSpeed config or model asks for something the DualPipe engine cannot run."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineOptions:
    """This adapter's keys of the config's ``"pipeline"`` dict (see the module docstring)."""

    schedule: str
    """A registered schedule name (lower case)."""
    overlap: bool = False
    """Run F&B pairs through the overlap engine when every layer of both chunks can be staged."""
    split_weights: bool = True
    """Split backwards into I and W where the schedule does (zero-bubble)."""
    timeout_s: float = 300.0
    """Seconds any pipeline communication may wait before the step fails naming the peer."""
    partition_method: str | None = None
    """Overrides the PipelineModule's partition_method (needed only for a module built before the import)."""


def _valid_names() -> str:
    return ", ".join([*schedule_names(), DEEPSPEED_SCHEDULE])


def read_pipeline_options(pipeline: Mapping[str, Any]) -> PipelineOptions | None:
    """The options, or None when DeepSpeed's own schedule is asked for (no key, or ``"deepspeed"``)."""
    name = pipeline.get("schedule")
    if name is None:
        return None
    if not isinstance(name, str):
        raise DeepSpeedPipelineConfigError(
            f'pipeline.schedule must be a string, got {name!r}; valid schedules: {_valid_names()}'
        )
    name = name.strip().lower()
    if name == DEEPSPEED_SCHEDULE:
        return None
    if name not in schedule_names():
        raise DeepSpeedPipelineConfigError(
            f'unknown pipeline schedule {pipeline.get("schedule")!r} in the DeepSpeed config '
            f'("pipeline": {{"schedule": ...}}); valid schedules: {_valid_names()}'
        )
    overlap = pipeline.get("overlap", False)
    split = pipeline.get("split_weights", True)
    for key, value in (("overlap", overlap), ("split_weights", split)):
        if not isinstance(value, bool):
            raise DeepSpeedPipelineConfigError(f"pipeline.{key} must be true or false, got {value!r}")
    timeout = pipeline.get("timeout_s", 300.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise DeepSpeedPipelineConfigError(f"pipeline.timeout_s must be a positive number of seconds, got {timeout!r}")
    method = pipeline.get("partition_method")
    if method is not None and not isinstance(method, str):
        raise DeepSpeedPipelineConfigError(
            f"pipeline.partition_method must be a string ('uniform', 'parameters' or 'type:REGEX'), got {method!r}"
        )
    return PipelineOptions(
        schedule=name, overlap=overlap, split_weights=split, timeout_s=float(timeout), partition_method=method
    )


def check_engine_setup(
    options: PipelineOptions,
    *,
    num_stages: int,
    micro_batches: int,
    zero_stage: int,
    tensor_parallel: int,
    pipe_partitioned: bool,
    grad_partitioned: bool,
    dynamic_shape: bool,
    has_bool_tensors: bool,
):
    """Every check of the config and model against ``options``; returns the schedule for ``micro_batches``."""
    name = options.schedule
    if zero_stage >= 2:
        raise DeepSpeedPipelineConfigError(
            f"zero_optimization.stage={zero_stage} partitions gradients, which pipeline parallelism does not "
            f"support (DeepSpeed's own pipeline engine refuses it too); use stage 0 or 1 with "
            f'"pipeline": {{"schedule": "{name}"}}'
        )
    if tensor_parallel > 1 and (pipe_partitioned or grad_partitioned):
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={name!r} sends whole activations between stages; with tensor parallelism "
            f"({tensor_parallel}) set \"pipe_partitioned\": false and \"grad_partitioned\": false in the "
            f"config's \"pipeline\" section (both default to true)"
        )
    if dynamic_shape:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={name!r} does not take dynamic_shape=True: activation shapes may change from "
            f"one train_batch to the next (each step sends its shapes once) but not between the micro-batches "
            f"of one step; build the PipelineModule with dynamic_shape=False"
        )
    if has_bool_tensors:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={name!r} does not take has_bool_tensors=True; send masks as integer or "
            f"floating tensors"
        )
    try:
        return build_schedule(name, num_stages, micro_batches)
    except ScheduleConfigError as error:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={name!r} with num_stages={num_stages} and gradient_accumulation_steps="
            f"{micro_batches} (the micro-batches of one train_batch): {error}"
        ) from None
