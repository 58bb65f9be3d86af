"""What a pipeline schedule cannot run with in a Megatron config, and the options of one Megatron pipeline.

Pure checks of a ``TransformerConfig`` against a schedule's spec, before any model is built or step
taken; every refusal names the setting and the fix. :func:`options_for` builds the pipeline's
:class:`~dualpipe_plugin.runtime.options.PipelineOptions` with Megatron's flag names in its messages.
"""

from __future__ import annotations

from typing import Any

from dualpipe_plugin.megatron.errors import MegatronScheduleError
from dualpipe_plugin.megatron.placement import ModelPlacement, places_chunks
from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.schedules import ScheduleConfigError, ScheduleSpec, get_schedule

__all__ = ["check_model_config", "megatron_spelling", "options_for"]

_UNSUPPORTED_TWO_CHUNK = (
    ("pipeline_model_parallel_layout", "a custom pipeline layout", "the schedule places layers itself"),
    ("num_layers_in_first_pipeline_stage", "uneven first-stage layer counts",
     "give every stage's count as configure_model_config(..., stage_layers=...)"),
    ("num_layers_in_last_pipeline_stage", "uneven last-stage layer counts",
     "give every stage's count as configure_model_config(..., stage_layers=...)"),
    ("account_for_embedding_in_pipeline_split", "account_for_embedding_in_pipeline_split",
     "give every stage's count as configure_model_config(..., stage_layers=...)"),
    ("account_for_loss_in_pipeline_split", "account_for_loss_in_pipeline_split",
     "give every stage's count as configure_model_config(..., stage_layers=...)"),
    ("mtp_num_layers", "multi-token prediction", "its layers would need the last stage on the last rank"),
    ("heterogeneous_block_specs", "heterogeneous block specs", "per-layer configs are not placed"),
)

_UNSUPPORTED_ANY = (
    ("defer_embedding_wgrad_compute", "defer_embedding_wgrad_compute",
     "the runtime's B/W split already defers weight gradients; turn it off"),
    ("overlap_moe_expert_parallel_comm", "overlap_moe_expert_parallel_comm",
     "that is Megatron's combined-1F1B overlap for its own schedules; with this package's schedules ask for "
     "configure_model_config(config, schedule, overlap=True) (Megatron-LM: --overlap-moe-expert-parallel-comm "
     "is translated)"),
    ("delay_wgrad_compute", "delay_wgrad_compute",
     "that is Transformer Engine's B/W split for Megatron's schedules; this plugin splits W itself, turn it off"),
    ("num_microbatches_with_partial_activation_checkpoints", "partial activation checkpointing per micro-batch",
     "use full or selective recomputation"),
)

_FLAGS = {
    "schedule": "--pipeline-schedule",
    "timeout_s": "--pipeline-timeout-s",
    "split_weights": "--no-pipeline-split-weights",
}


def megatron_spelling(field: str) -> str:
    """How an option is named in Megatron's flags (error messages name the flag to change)."""
    return _FLAGS.get(field, f"config.pipeline_options.{field}")


def options_for(schedule: str | ScheduleSpec, **values: Any) -> PipelineOptions:
    """The options of one Megatron pipeline, checked with Megatron's flag names in the messages."""
    try:
        spec = get_schedule(schedule)
    except ScheduleConfigError as error:
        raise MegatronScheduleError(str(error)) from None
    return PipelineOptions.from_values(
        {"schedule": spec, **values}, spell=megatron_spelling, error=MegatronScheduleError
    )


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0)


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def check_model_config(config: Any, schedule: str | ScheduleSpec, stage_layers: Any = None) -> None:
    """Refuse settings ``schedule`` cannot run with, before any model is built or step taken.

    ``stage_layers`` (default: ``config.pipeline_stage_layers``) are transformer layers per stage for a
    two-chunk schedule; one-chunk schedules keep Megatron's own placement, set with its
    ``pipeline_model_parallel_layout``."""
    spec = get_schedule(schedule)
    if stage_layers is None:
        stage_layers = getattr(config, "pipeline_stage_layers", None)
    name = spec.name
    for attr, what, why in _UNSUPPORTED_ANY:
        if _is_set(getattr(config, attr, None)):
            raise MegatronScheduleError(f"pipeline schedule {name!r} does not support {what} ({attr}): {why}")
    if getattr(config, "fp8", None) and not _te_available():
        raise MegatronScheduleError(
            f"fp8={config.fp8!r} needs Transformer Engine, which is not installed; install transformer_engine "
            f"or drop fp8"
        )
    configured = getattr(config, "pipeline_options", None)
    if places_chunks(spec):
        vp = config.virtual_pipeline_model_parallel_size
        if vp is not None and (configured is None or configured.schedule is not spec):
            raise MegatronScheduleError(
                f"{name} places two chunks per rank itself; do not also set the virtual pipeline size "
                f"(virtual_pipeline_model_parallel_size={config.virtual_pipeline_model_parallel_size}, "
                f"--virtual-pipeline-model-parallel-size / --num-layers-per-virtual-pipeline-stage): remove it"
            )
        for attr, what, why in _UNSUPPORTED_TWO_CHUNK:
            if _is_set(getattr(config, attr, None)):
                raise MegatronScheduleError(f"{name} does not support {what} ({attr}): {why}")
        ModelPlacement(spec, config.pipeline_model_parallel_size, getattr(config, "num_layers", None),
                       stage_layers)  # counts, P even
    elif stage_layers is not None:
        raise MegatronScheduleError(
            f"{name} runs one chunk per rank in Megatron's own placement, so stage_layers={tuple(stage_layers)} does "
            f"not apply; set Megatron's pipeline_model_parallel_layout instead (--pipeline-model-parallel-layout, "
            f"e.g. 'E' + 't' * n0 + '|' + ... + 'L': dualpipe-plugin advise --profile prints it)"
        )
    elif config.virtual_pipeline_model_parallel_size is not None:
        raise MegatronScheduleError(
            f"{name} runs one chunk per rank; unset virtual_pipeline_model_parallel_size "
            f"(={config.virtual_pipeline_model_parallel_size}) or use the 'megatron' schedule for interleaving"
        )
    else:
        try:
            spec.check(config.pipeline_model_parallel_size)
        except ScheduleConfigError as error:
            raise MegatronScheduleError(str(error)) from None
