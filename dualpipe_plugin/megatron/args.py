"""``--pipeline-schedule`` and the pipeline's other flags for Megatron-style command lines.

:func:`add_pipeline_schedule_args` adds them to an argparse parser (Megatron-LM's ``extra_args_provider``
convention); :func:`apply_schedule_args` checks a parsed namespace once, before any model is built, and
leaves the pipeline's :class:`~dualpipe_plugin.runtime.options.PipelineOptions` on it as
``args.pipeline_options`` (None for Megatron's own schedule). For a two-chunk schedule it also sets
``args.virtual_pipeline_model_parallel_size = 2``, so Megatron-LM builds two chunks per rank, one data
iterator per chunk, per-chunk DDP and ``model0``/``model1`` checkpoint entries, as for interleaving.

Flags (defaults are the runtime's):

* ``--pipeline-schedule NAME``: ``megatron`` (Megatron-Core's 1F1B or interleaved; the default), any
  schedule of this package, or a name given to ``register_schedule``;
* ``--pipeline-timeout-s SECONDS``: how long any pipeline communication may wait;
* ``--no-pipeline-split-weights``: run every backward whole (no B/W split).

Megatron's ``--overlap-moe-expert-parallel-comm`` keeps its meaning, hiding the expert-parallel all-to-all
behind compute: with ``dualpipev``/``dualpipe`` the F&B pairs run through the overlap engine
(``PipelineOptions.overlap``) and Megatron's own combined-1F1B machinery stays off.
"""

from __future__ import annotations

import argparse

from dualpipe_plugin.megatron.config_checks import options_for
from dualpipe_plugin.megatron.errors import MegatronScheduleError, UnknownScheduleError
from dualpipe_plugin.megatron.placement import ModelPlacement, places_chunks
from dualpipe_plugin.megatron.registry import MEGATRON, default_registry
from dualpipe_plugin.runtime.options import DEFAULT_TIMEOUT_S
from dualpipe_plugin.schedules import SCHEDULES, ScheduleConfigError, schedule_names

__all__ = ["add_pipeline_schedule_args", "apply_schedule_args", "request_virtual_stages"]

_USER_VIRTUAL_FLAGS = (
    ("virtual_pipeline_model_parallel_size", "--virtual-pipeline-model-parallel-size"),
    ("num_layers_per_virtual_pipeline_stage", "--num-layers-per-virtual-pipeline-stage"),
    ("num_virtual_stages_per_pipeline_rank", "--num-virtual-stages-per-pipeline-rank"),
    ("pipeline_model_parallel_layout", "--pipeline-model-parallel-layout"),
)


def add_pipeline_schedule_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider`` convention: add the pipeline flags and return the parser."""
    names = default_registry().names()
    ours = "; ".join(f"'{spec.name}': {spec.summary}" for spec in SCHEDULES.values())
    group = parser.add_argument_group(title="dualpipe_plugin pipeline schedule")
    group.add_argument(
        "--pipeline-schedule", type=str.lower, default=MEGATRON, choices=names,
        help=f"pipeline-parallel schedule: 'megatron' (default: Megatron-Core's 1F1B or interleaved); {ours}",
    )
    group.add_argument(
        "--pipeline-timeout-s", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="seconds any pipeline communication may wait before the step fails naming the peer",
    )
    group.add_argument(
        "--no-pipeline-split-weights", dest="pipeline_split_weights", action="store_false",
        help="run every backward whole (no B/W split into input and weight gradients)",
    )
    return parser


def _our_two_chunk_spec(args: argparse.Namespace):
    name = (getattr(args, "pipeline_schedule", MEGATRON) or MEGATRON).lower()
    if name not in schedule_names():
        return None
    spec = SCHEDULES[name]
    return spec if places_chunks(spec) else None


def _refuse_user_virtual_stages(args: argparse.Namespace, name: str) -> None:
    given = [flag for attr, flag in _USER_VIRTUAL_FLAGS if getattr(args, attr, None) is not None]
    if given:
        raise MegatronScheduleError(
            f"--pipeline-schedule {name} places two chunks per rank itself; remove {' / '.join(given)}"
        )


def _take_overlap_flag(args: argparse.Namespace, name: str) -> None:
    """``--overlap-moe-expert-parallel-comm`` means "hide the expert all-to-all behind compute": with this
    package's schedules the F&B pairs do that (``PipelineOptions.overlap``), so Megatron's own combined-1F1B
    machinery stays off."""
    if not getattr(args, "overlap_moe_expert_parallel_comm", False):
        return
    if not SCHEDULES[name].runs_pairs:
        raise MegatronScheduleError(
            f"--overlap-moe-expert-parallel-comm hides the expert all-to-all inside F&B pairs, which "
            f"--pipeline-schedule {name} does not run; use dualpipev or dualpipe, or drop the flag"
        )
    args.overlap_moe_expert_parallel_comm = False
    args.pipeline_overlap = True


def request_virtual_stages(args: argparse.Namespace) -> argparse.Namespace:
    """Megatron-LM's path, between parsing and validation: for a two-chunk schedule ask for two virtual
    stages per rank through Megatron's own flag (``--num-virtual-stages-per-pipeline-rank 2``), so that its
    validation derives the virtual pipeline size and keeps the settings that go with it
    (``overlap_p2p_comm``, ``align_param_gather``, hence ``param_sync_func``). A virtual pipeline flag of
    the user's is refused. A no-op for other schedules, and where Megatron has no such flag."""
    name = (getattr(args, "pipeline_schedule", MEGATRON) or MEGATRON).lower()
    if name in schedule_names():
        _take_overlap_flag(args, name)
    spec = _our_two_chunk_spec(args)
    if spec is None or getattr(args, "_dualpipe_virtual_stages", None) == spec.name:
        return args
    _refuse_user_virtual_stages(args, spec.name)
    if getattr(args, "num_layers", None) is not None:
        ModelPlacement(spec, args.pipeline_model_parallel_size, args.num_layers)  # before Megatron's own checks
    if hasattr(args, "num_virtual_stages_per_pipeline_rank"):
        args.num_virtual_stages_per_pipeline_rank = 2
        args._dualpipe_virtual_stages = spec.name
    return args


def apply_schedule_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check Megatron-LM-style ``args`` for ``args.pipeline_schedule`` and put the pipeline's options on them
    (``args.pipeline_options``); for a two-chunk schedule set the virtual pipeline size to 2. Idempotent.
    Raises :class:`MegatronScheduleError` naming the flag to change."""
    name = (getattr(args, "pipeline_schedule", MEGATRON) or MEGATRON).lower()
    if name not in default_registry().names():
        raise UnknownScheduleError(
            f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(default_registry().names())}"
        )
    if getattr(args, "_dualpipe_applied", None) == name:
        return args
    if name == MEGATRON or name not in schedule_names():
        args.pipeline_options = None  # Megatron's own, or a registered function that checks its own settings
        return args
    _take_overlap_flag(args, name)
    options = options_for(
        name,
        timeout_s=getattr(args, "pipeline_timeout_s", DEFAULT_TIMEOUT_S),
        split_weights=getattr(args, "pipeline_split_weights", True),
        overlap=getattr(args, "pipeline_overlap", None),
    )
    spec = options.schedule
    pp = args.pipeline_model_parallel_size
    if places_chunks(spec):
        if getattr(args, "_dualpipe_virtual_stages", None) != name:  # else the 2 virtual stages are ours
            _refuse_user_virtual_stages(args, name)
        ModelPlacement(spec, pp, args.num_layers)
    elif getattr(args, "virtual_pipeline_model_parallel_size", None) is not None:
        raise MegatronScheduleError(
            f"--pipeline-schedule {name} runs one chunk per rank; remove --virtual-pipeline-model-parallel-size "
            f"or use --pipeline-schedule megatron for interleaving"
        )
    dp = getattr(args, "data_parallel_size", None)
    gbs, mbs = getattr(args, "global_batch_size", None), getattr(args, "micro_batch_size", None)
    if dp and gbs and mbs:
        microbatches = gbs // (mbs * dp)
        try:
            spec.check(pp, microbatches)
        except ScheduleConfigError as error:
            raise MegatronScheduleError(
                f"{error} (--global-batch-size {gbs} / (--micro-batch-size {mbs} x data-parallel size {dp}) "
                f"= {microbatches} micro-batches per step): raise --global-batch-size"
            ) from None
    if places_chunks(spec):
        args.virtual_pipeline_model_parallel_size = 2
    args.pipeline_options = options
    args._dualpipe_applied = name
    return args
