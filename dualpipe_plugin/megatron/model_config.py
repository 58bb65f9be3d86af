"""Marking a Megatron ``TransformerConfig`` for a pipeline schedule (the adapter's door for a config).

:func:`configure_model_config` is what a user's own loop calls before building the model; the flags of
:mod:`~dualpipe_plugin.megatron.args` and Megatron-LM's patched ``core_transformer_config_from_args`` go
through it too. It builds the pipeline's :class:`~dualpipe_plugin.runtime.options.PipelineOptions` once
and stores them on the config next to the schedule's name:

* ``config.pipeline_schedule``: the registry key that ``get_forward_backward_func()`` dispatches on
  (``"megatron"``, one of this package's schedules, or a name given to ``register_schedule``);
* ``config.pipeline_options``: for this package's schedules, the options every later step reads (the
  placement hooks, :class:`~dualpipe_plugin.megatron.schedule_fn.PipelineScheduleFunction`).
"""

from __future__ import annotations

from typing import Any, Sequence

from dualpipe_plugin.megatron.config_checks import check_model_config, options_for
from dualpipe_plugin.megatron.errors import MegatronScheduleError
from dualpipe_plugin.megatron.placement import install_placement_hooks, places_chunks
from dualpipe_plugin.megatron.registry import MEGATRON, default_registry
from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.schedules import ScheduleSpec, schedule_names

__all__ = ["configure_model_config", "configure_from_args"]


def configure_model_config(
    config: Any, schedule: str | ScheduleSpec | PipelineOptions, *, stage_layers: Sequence[int] | None = None,
    **option_values: Any,
) -> Any:
    """Mark ``config`` (a ``TransformerConfig``) for ``schedule``, before the model is built. Returns it.

    ``schedule`` is a name, a spec, or ready :class:`PipelineOptions`; ``option_values`` are further
    option fields (``timeout_s``, ``split_weights``, ...). For this package's schedules it sets
    ``config.pipeline_schedule`` and ``config.pipeline_options`` and, for a two-chunk schedule,
    ``virtual_pipeline_model_parallel_size = 2`` (chunks built with ``vp_stage`` 0 and 1) and installs the
    placement hooks. ``stage_layers`` cuts a two-chunk schedule's stages unevenly (transformer layers per
    stage, stage 0 first, as ``dualpipe-plugin advise --profile`` prints them; stored as
    ``config.pipeline_stage_layers``); without it the stages are uniform. Calling it again with the same
    options is a no-op. ``"megatron"`` (or a name given to :func:`~dualpipe_plugin.megatron.register_schedule`)
    only sets ``config.pipeline_schedule``.
    """
    stage_layers = None if stage_layers is None else tuple(stage_layers)
    if isinstance(schedule, PipelineOptions):
        options = schedule.replace(**option_values) if option_values else schedule
    else:
        name = schedule.lower() if isinstance(schedule, str) else None
        if name is not None and name not in schedule_names():  # Megatron's own, or a registered function
            if name != MEGATRON:
                default_registry().lookup(name)  # UnknownScheduleError listing the valid names
            if stage_layers is not None:
                raise MegatronScheduleError(
                    f"schedule {name!r} keeps Megatron's own placement, so stage_layers={stage_layers} does not "
                    f"apply; set Megatron's pipeline_model_parallel_layout instead"
                )
            config.pipeline_schedule = name
            config.pipeline_options = None
            return config
        options = options_for(schedule, **option_values)
    if (getattr(config, "pipeline_options", None) == options
            and getattr(config, "pipeline_stage_layers", None) == stage_layers):
        return config
    # On the unmarked config: a user-set virtual size is refused.
    check_model_config(config, options.schedule, stage_layers)
    config.pipeline_stage_layers = stage_layers
    _mark(config, options)
    return config


def configure_from_args(config: Any, args: Any) -> Any:
    """Megatron-LM's path: mark ``config`` with the options :func:`~dualpipe_plugin.megatron.args.apply_schedule_args`
    put on ``args`` (which already set the virtual pipeline size to 2 for a two-chunk schedule), then check it."""
    options = getattr(args, "pipeline_options", None)
    if options is None:
        config.pipeline_schedule = (getattr(args, "pipeline_schedule", None) or MEGATRON).lower()
        config.pipeline_options = None
        return config
    _mark(config, options)
    check_model_config(config, options.schedule)
    return config


def _mark(config: Any, options: PipelineOptions) -> None:
    if places_chunks(options.schedule):
        install_placement_hooks()
        config.virtual_pipeline_model_parallel_size = 2
    config.pipeline_schedule = options.schedule.name
    config.pipeline_options = options
