"""The replacements :func:`~dualpipe_plugin.megatron.lm_patch.patch_megatron_lm` puts into Megatron-LM's code.

Each ``*_hook(original)`` returns the function that stands in for ``original``; it defers to the original
unless Megatron-LM's parsed arguments carry options of this package's schedules (``args.pipeline_options``,
set by :func:`~dualpipe_plugin.megatron.args.apply_schedule_args`), and then answers from the schedule's
placement. Megatron-LM numbers stages ``vp_stage * P + pp_rank`` in every question it asks (which layers
to build, which chunk holds the embedding or the loss, which rank reads which part of a batch); a V or
mirrored placement answers them differently, so each of those questions is one hook here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from dualpipe_plugin.megatron.errors import MegatronScheduleError

__all__ = [
    "build_stages_hook", "config_hook", "forward_backward_hook", "get_batch_on_tp_rank_hook", "get_model_hook",
    "lm_placement", "parse_args_hook", "stage_predicate_hook", "validate_args_hook",
]


def _megatron_lm_args() -> Any | None:
    try:
        from megatron.training.global_vars import get_args
    except ImportError:
        return None
    try:
        return get_args()
    except AssertionError:  # arguments not parsed yet
        return None


def lm_placement():
    """The two-chunk :class:`~dualpipe_plugin.megatron.placement.ModelPlacement` Megatron-LM's arguments
    ask for, or None (Megatron's own placement)."""
    from dualpipe_plugin.megatron.placement import ModelPlacement, places_chunks

    args = _megatron_lm_args()
    options = getattr(args, "pipeline_options", None)
    if options is None or not places_chunks(options.schedule):
        return None
    return ModelPlacement(options.schedule, args.pipeline_model_parallel_size, args.num_layers)


def _pp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


# ------------------------------------------------------------------------------------------ arguments


def parse_args_hook(original: Callable) -> Callable:
    """Chain the pipeline flags into ``extra_args_provider``; then, before Megatron validates the arguments,
    ask for two virtual stages per rank for a two-chunk schedule, so Megatron's validation keeps the
    settings that go with them (``overlap_p2p_comm``, ``align_param_gather``)."""
    from dualpipe_plugin.megatron.args import add_pipeline_schedule_args, request_virtual_stages

    @functools.wraps(original)
    def parse_args(extra_args_provider=None, *args, **kwargs):
        def provider(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            return add_pipeline_schedule_args(parser)

        return request_virtual_stages(original(provider, *args, **kwargs))

    return parse_args


def validate_args_hook(original: Callable) -> Callable:
    from dualpipe_plugin.megatron.args import apply_schedule_args

    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        result = original(args, *rest, **kwargs)
        apply_schedule_args(args)
        return result

    return validate_args


def config_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def core_transformer_config_from_args(args, *rest, **kwargs):
        from dualpipe_plugin.megatron.model_config import configure_from_args

        return configure_from_args(original(args, *rest, **kwargs), args)

    return core_transformer_config_from_args


# ------------------------------------------------------------------------------------------- models


def _prepared(chunks: list) -> list:
    """After a two-chunk model is built: copies that must start equal made equal, mirrored copies marked as
    checkpoint replicas."""
    from megatron.core import parallel_state

    from dualpipe_plugin.megatron.placement import mark_copies_as_replicas, synchronize_initial_copies

    synchronize_initial_copies(chunks, pp_group=parallel_state.get_pipeline_model_parallel_group())
    mark_copies_as_replicas(chunks)
    return chunks


def get_model_hook(original: Callable) -> Callable:
    """``training.get_model``: the provider gets the placement's ``pre_process``/``post_process`` for each
    ``vp_stage`` (a V has both ends on rank 0)."""

    @functools.wraps(original)
    def get_model(model_provider_func, *args, **kwargs):
        placement = lm_placement()
        if placement is None:
            return original(model_provider_func, *args, **kwargs)
        rank = _pp_rank()

        def provider(*pargs, **pkwargs):
            chunk = placement.chunk(rank, pkwargs.get("vp_stage") or 0)
            if "pre_process" in pkwargs or len(pargs) < 2:
                pkwargs["pre_process"], pkwargs["post_process"] = chunk.pre_process, chunk.post_process
            else:
                pargs = (chunk.pre_process, chunk.post_process) + tuple(pargs[2:])
            return model_provider_func(*pargs, **pkwargs)

        model = original(provider, *args, **kwargs)
        _prepared(model if isinstance(model, list) else [model])
        return model

    return get_model


def build_stages_hook(original: Callable) -> Callable:
    """``dist_utils.build_virtual_pipeline_stages`` (megatron-core >= 0.19's builder path, which bypasses
    ``get_model``): one chunk per placement slot, with the placement's ``pre_process``/``post_process``."""

    @functools.wraps(original)
    def build_virtual_pipeline_stages(build_model_func, pg_collection, vp_size, *args, **kwargs):
        placement = lm_placement()
        if placement is None:
            return original(build_model_func, pg_collection, vp_size, *args, **kwargs)
        model_type = kwargs.get("model_type", args[0] if args else None)
        rank = pg_collection.pp.rank()
        chunks = []
        for chunk in placement.chunks(rank):
            module = build_model_func(pg_collection, pre_process=chunk.pre_process, post_process=chunk.post_process,
                                      vp_stage=chunk.chunk)
            if model_type is not None:
                module.model_type = model_type
            chunks.append(module)
        return _prepared(chunks)

    return build_virtual_pipeline_stages


# --------------------------------------------------------------------------------------------- data


def stage_predicate_hook(original: Callable) -> Callable:
    """``is_first_or_last_pipeline_stage(vp_stage)``: does this chunk (every chunk of the rank when
    ``vp_stage`` is None) hold a first or a last stage of the placement? Decides which chunks read data
    (``get_batch``) and on which ranks datasets are built (``is_dataset_built_on_rank``)."""

    @functools.wraps(original)
    def is_first_or_last_pipeline_stage(vp_stage=None):
        placement = lm_placement()
        if placement is None:
            return original(vp_stage)
        rank = _pp_rank()
        chunks = placement.chunks(rank) if vp_stage is None else [placement.chunk(rank, vp_stage)]
        return any(chunk.pre_process or chunk.post_process for chunk in chunks)

    return is_first_or_last_pipeline_stage


def get_batch_on_tp_rank_hook(original: Callable) -> Callable:
    """``megatron.core.utils.get_batch_on_this_tp_rank``: its caller passes rank-based first/last flags, and
    on a rank that is "first" it drops labels and loss mask. A rank of a V (or of DualPipe's ends) that
    holds both a first and a last stage needs everything: it broadcasts the whole batch, as without
    pipelining."""

    @functools.wraps(original)
    def get_batch_on_this_tp_rank(*args, **kwargs):
        placement = lm_placement()
        if placement is not None:
            chunks = placement.chunks(_pp_rank())
            if any(c.pre_process for c in chunks) and any(c.post_process for c in chunks):
                kwargs.update(pipeline_model_parallel_size=1, is_pipeline_first_stage=True,
                              is_pipeline_last_stage=True)
        return original(*args, **kwargs)

    return get_batch_on_this_tp_rank


# ---------------------------------------------------------------------------------------- schedules


class _CheckedDispatch:
    """The registry's dispatch, refusing a model that Megatron-LM built without this package's placement
    although its arguments ask for one of this package's schedules (a patch applied after the script
    imported Megatron-LM's config helpers): every rank raises at the first step, before any transfer."""

    def __init__(self, dispatch: Callable):
        self._dispatch = dispatch

    def __call__(self, **kwargs: Any) -> list:
        from megatron.core.utils import get_model_config

        args = _megatron_lm_args()
        wanted = getattr(args, "pipeline_options", None)
        model = kwargs.get("model")
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        config = get_model_config(chunks[0])
        if wanted is not None and getattr(config, "pipeline_options", None) != wanted:
            raise MegatronScheduleError(
                f"--pipeline-schedule {wanted.schedule.name} was parsed, but the model was built from a config "
                f"that patch_megatron_lm() did not mark (config.pipeline_schedule="
                f"{getattr(config, 'pipeline_schedule', None)!r}): the patch came after the training script "
                f"imported Megatron-LM's helpers. Call dualpipe_plugin.megatron.patch_megatron_lm() before "
                f"importing megatron.training, or run the script with python -m "
                f"dualpipe_plugin.megatron.run_megatron_lm SCRIPT.py ..."
            )
        if wanted is not None:
            _check_built_by_placement(wanted, chunks)
        return self._dispatch(**kwargs)


def _check_built_by_placement(wanted, chunks: list) -> None:
    from dualpipe_plugin.megatron.placement import unwrap

    placement = lm_placement()
    expected = placement.chunks(_pp_rank()) if placement is not None else None
    built = [(bool(getattr(unwrap(c), "pre_process", False)), bool(getattr(unwrap(c), "post_process", False)))
             for c in chunks]
    if expected is not None and built != [(c.pre_process, c.post_process) for c in expected]:
        raise MegatronScheduleError(
            f"--pipeline-schedule {wanted.schedule.name}: the model chunks of pipeline rank {_pp_rank()} were not "
            f"built by its placement (pre/post-process {built}, expected "
            f"{[(c.pre_process, c.post_process) for c in expected]}): the model was built through a get_model or "
            f"build_virtual_pipeline_stages that patch_megatron_lm() did not replace; call it before importing "
            f"megatron.training (or run the script with python -m dualpipe_plugin.megatron.run_megatron_lm)"
        )


def forward_backward_hook(original: Callable) -> Callable:
    from dualpipe_plugin.megatron.registry import default_registry

    @functools.wraps(original)
    def get_forward_backward_func(pp_size=None, vp_size=None, schedule_pg_collection=None):
        # megatron-core >= 0.19's train()/evaluate() pass schedule_pg_collection=.
        return _CheckedDispatch(default_registry().get_forward_backward_func(pp_size, vp_size, schedule_pg_collection))

    return get_forward_backward_func
