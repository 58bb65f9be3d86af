"""The ``"pipeline"`` section of a DeepSpeed config, as this adapter reads it, and its checks.

DeepSpeed copies the JSON ``"pipeline"`` dict verbatim into ``DeepSpeedConfig.pipeline``, so the keys
below sit next to DeepSpeed's own (``activation_checkpoint_interval``, ``use_reentrant``, ...)::

    "pipeline": {
        "schedule": "dualpipev",      # any registered schedule (dualpipe, dualpipev, 1f1b, zb1p, zbv)
                                      # or deepspeed (the default: DeepSpeed's TrainSchedule)
        "overlap": true,              # F&B pairs through the overlap engine where the layers support it (default false)
        "split_weights": true,        # the B/W split (zero-bubble W passes); false runs every backward whole
        "timeout_s": 300,             # every pipeline communication wait
        "partition_method": "uniform" # only needed if the PipelineModule was built before the import
    }

The first four are :class:`~dualpipe_plugin.runtime.options.PipelineOptions` fields (their defaults and
checks are the runtime's; ``overlap`` defaults to false here); ``partition_method`` is this adapter's.

Every check runs in ``deepspeed.initialize``, before the model is re-partitioned or the optimizer is
built, and fails with a :class:`DeepSpeedPipelineConfigError` (a ``ValueError``) that names the fix.
"""

from __future__ import annotations

from typing import Any, Mapping

from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.schedules import Placement, ScheduleConfigError, get_schedule, schedule_names

__all__ = [
    "DEEPSPEED_SCHEDULE", "DeepSpeedPipelineConfigError", "check_engine_setup", "pipeline_section",
    "read_partition_method", "read_pipeline_options",
]

DEEPSPEED_SCHEDULE = "deepspeed"
"""``"schedule": "deepspeed"`` (or no ``"schedule"`` key) keeps DeepSpeed's own TrainSchedule."""

_KEYS = ("schedule", "overlap", "split_weights", "timeout_s")
"""The runtime options a DeepSpeed config sets (the rest keep PipelineOptions' defaults)."""


class DeepSpeedPipelineConfigError(ValueError):
    """The DeepSpeed config or model asks for something the DualPipe engine cannot run."""


def _valid_names() -> str:
    return ", ".join([*schedule_names(), DEEPSPEED_SCHEDULE])


def _spell(field: str) -> str:
    return f"pipeline.{field}"


def pipeline_section(arguments: dict) -> dict:
    """The ``"pipeline"`` dict of the config an engine is being built with (its ``__init__`` keyword
    arguments); builds ``arguments["config_class"]`` the way ``deepspeed.initialize`` does if it is missing."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.pipe.module import PipelineModule

    config = arguments.get("config_class")
    if config is None:
        source = arguments.get("config")
        args = arguments.get("args")
        if source is None and args is not None:
            source = getattr(args, "deepspeed_config", None)
        model = arguments.get("model")
        mpu = arguments.get("mpu") or (model.mpu() if isinstance(model, PipelineModule) else None)
        config = DeepSpeedConfig(source, mpu)
        arguments["config_class"] = config
    return config.pipeline


def read_pipeline_options(pipeline: Mapping[str, Any]) -> PipelineOptions | None:
    """The runtime options of a config's ``"pipeline"`` section, or None when DeepSpeed's own schedule is
    asked for (no ``"schedule"`` key, or ``"deepspeed"``). ``overlap`` defaults to false here."""
    name = pipeline.get("schedule")
    if name is None:
        return None
    if not isinstance(name, str):
        raise DeepSpeedPipelineConfigError(
            f'pipeline.schedule must be a string, got {name!r}; valid schedules: {_valid_names()}'
        )
    if name.strip().lower() == DEEPSPEED_SCHEDULE:
        return None
    try:
        spec = get_schedule(name)
    except ScheduleConfigError:
        raise DeepSpeedPipelineConfigError(
            f'unknown pipeline schedule {name!r} in the DeepSpeed config ("pipeline": {{"schedule": ...}}); '
            f'valid schedules: {_valid_names()}'
        ) from None
    values = {key: pipeline[key] for key in _KEYS if key in pipeline}
    values["schedule"] = spec
    values.setdefault("overlap", False)
    return PipelineOptions.from_values(values, spell=_spell, error=DeepSpeedPipelineConfigError)


def read_partition_method(pipeline: Mapping[str, Any]) -> str | None:
    """``pipeline.partition_method``: overrides the PipelineModule's (needed only for a module built before
    ``import dualpipe_plugin.deepspeed``)."""
    method = pipeline.get("partition_method")
    if method is not None and not isinstance(method, str):
        raise DeepSpeedPipelineConfigError(
            f"pipeline.partition_method must be a string ('uniform', 'parameters' or 'type:REGEX'), got {method!r}"
        )
    return method


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
) -> Placement:
    """Every check of the config and model against ``options``; returns the schedule's placement."""
    name = options.schedule.name
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
        options.schedule.check(num_stages, micro_batches)
    except ScheduleConfigError as error:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={name!r} with num_stages={num_stages} and gradient_accumulation_steps="
            f"{micro_batches} (the micro-batches of one train_batch): {error}"
        ) from None
    return options.schedule.placement(num_stages)
