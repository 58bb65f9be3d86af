"""``patch_megatron_lm()``: Megatron-LM's own training code (``megatron.training``) on ``--pipeline-schedule``.

For Megatron-LM's ``pretrain_gpt.py``::

    import dualpipe_plugin.megatron as dpm
    dpm.patch_megatron_lm()            # before pretrain(...); e.g. at the top of pretrain_gpt.py
    # then: torchrun ... pretrain_gpt.py <Megatron-LM args> --pipeline-schedule dualpipev

or, without editing Megatron-LM: ``python -m dualpipe_plugin.megatron.run_megatron_lm pretrain_gpt.py ...``.

What it changes (each a binding in Megatron-LM's ``megatron.training`` package, replaced in the defining
module and in every loaded ``megatron.*`` / ``__main__`` module that imported it by name, through the
adapter's :mod:`~dualpipe_plugin.megatron.patching` room; the returned :class:`PatchSet` undoes them):

1. ``arguments.parse_args``: the ``extra_args_provider`` passed to ``pretrain`` is chained with
   :func:`~dualpipe_plugin.megatron.args.add_pipeline_schedule_args`, so the pipeline flags parse alongside
   Megatron-LM's.
2. ``arguments.validate_args``: after Megatron-LM's own validation,
   :func:`~dualpipe_plugin.megatron.args.apply_schedule_args` refuses bad combinations and, for a two-chunk
   schedule, sets ``args.virtual_pipeline_model_parallel_size = 2``.
3. ``arguments.core_transformer_config_from_args``: the returned config is marked with the schedule and
   its options and checked (:func:`~dualpipe_plugin.megatron.model_config.configure_from_args`); this
   switches on the placement hooks (layer numbers) for that config.
4. ``training.get_model``: the model provider gets the placement's ``pre_process``/``post_process`` for each
   ``vp_stage`` (a V has both ends on rank 0), and after the chunks are built the copies that must start
   equal are made equal (tied embedding; DualPipe's mirrored stages).
5. ``training.get_forward_backward_func`` and ``megatron.core.pipeline_parallel.get_forward_backward_func``:
   this package's registry, which picks the function from ``config.pipeline_schedule`` on each call
   (``megatron``, the default, gives Megatron's own).

Tested here (``tests/megatron/test_args.py``) against stand-in ``megatron.training`` modules that call
these bindings the way Megatron-LM does; not a real Megatron-LM ``pretrain()`` run.
"""

from __future__ import annotations

from typing import Any, Callable

from dualpipe_plugin.megatron.args import add_pipeline_schedule_args, apply_schedule_args
from dualpipe_plugin.megatron.patching import Patch, PatchSet, everywhere
from dualpipe_plugin.megatron.registry import default_registry

__all__ = ["patch_megatron_lm"]

_USERS = ("__main__",)
"""Besides ``megatron.*``: the running script may have imported these functions by name too."""


def _chain_args(extra_args_provider: Callable | None) -> Callable:
    def provider(parser):
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return add_pipeline_schedule_args(parser)

    return provider


def _parse_args_hook(original: Callable) -> Callable:
    def parse_args(extra_args_provider=None, *args, **kwargs):
        return original(_chain_args(extra_args_provider), *args, **kwargs)

    return parse_args


def _validate_args_hook(original: Callable) -> Callable:
    def validate_args(args, *rest, **kwargs):
        result = original(args, *rest, **kwargs)
        apply_schedule_args(args)
        return result

    return validate_args


def _config_hook(original: Callable) -> Callable:
    def core_transformer_config_from_args(args, *rest, **kwargs):
        from dualpipe_plugin.megatron.model_config import configure_from_args

        return configure_from_args(original(args, *rest, **kwargs), args)

    return core_transformer_config_from_args


def _get_model_hook(original: Callable) -> Callable:
    def get_model(model_provider_func, *args, **kwargs):
        from megatron.core import parallel_state
        from megatron.training.global_vars import get_args

        from dualpipe_plugin.megatron.placement import ModelPlacement, places_chunks, synchronize_initial_copies

        margs = get_args()
        options = getattr(margs, "pipeline_options", None)
        if options is None or not places_chunks(options.schedule):
            return original(model_provider_func, *args, **kwargs)
        placement = ModelPlacement(options.schedule, margs.pipeline_model_parallel_size, margs.num_layers)
        rank = parallel_state.get_pipeline_model_parallel_rank()

        def provider(*pargs, **pkwargs):
            chunk = placement.chunk(rank, pkwargs.get("vp_stage") or 0)
            if "pre_process" in pkwargs or len(pargs) < 2:
                pkwargs["pre_process"], pkwargs["post_process"] = chunk.pre_process, chunk.post_process
            else:
                pargs = (chunk.pre_process, chunk.post_process) + tuple(pargs[2:])
            return model_provider_func(*pargs, **pkwargs)

        model = original(provider, *args, **kwargs)
        chunks = model if isinstance(model, list) else [model]
        synchronize_initial_copies(chunks, pp_group=parallel_state.get_pipeline_model_parallel_group())
        return model

    return get_model


def _forward_backward_hook(original: Callable) -> Callable:
    def get_forward_backward_func(pp_size=None, vp_size=None, schedule_pg_collection=None):
        # megatron-core >= 0.19's train()/evaluate() pass schedule_pg_collection=.
        return default_registry().get_forward_backward_func(pp_size, vp_size, schedule_pg_collection)

    return get_forward_backward_func


def patch_megatron_lm() -> PatchSet:
    """Route Megatron-LM's training through ``--pipeline-schedule`` (see the module docstring for what changes).

    Call once, before ``pretrain(...)``. Returns the applied :class:`PatchSet` (``.undo()`` restores every
    binding). Raises ``ImportError`` naming the fix when Megatron-LM's ``megatron.training`` package is not
    importable.
    """
    try:
        from megatron.training import arguments, training
    except ImportError as error:
        raise ImportError(
            "patch_megatron_lm() patches Megatron-LM's megatron.training package, which is not importable "
            f"here ({error}); install Megatron-LM (or put it on PYTHONPATH), or use launch/pretrain_gpt.py, "
            "which runs on Megatron-Core alone"
        ) from None
    import megatron.core.pipeline_parallel as core_pipeline_parallel

    def by_name(home: Any, attr: str, make: Callable, why: str) -> list[Patch]:
        return everywhere(home, attr, make, why, extra=_USERS)

    patches = PatchSet()
    patches.apply([
        *by_name(arguments, "parse_args", _parse_args_hook, "chain the pipeline flags into extra_args_provider"),
        *by_name(arguments, "validate_args", _validate_args_hook, "check the schedule; two chunks per rank"),
        *by_name(arguments, "core_transformer_config_from_args", _config_hook, "mark the config"),
        *by_name(training, "get_model", _get_model_hook, "the placement's pre/post-process per chunk"),
        # Only these two bindings: megatron.core.pipeline_parallel.schedules keeps Megatron's own function,
        # which the registry calls for the 'megatron' schedule.
        *(Patch(owner, "get_forward_backward_func", _forward_backward_hook(owner.get_forward_backward_func),
                "the registry picks the schedule from config.pipeline_schedule")
          for owner in (training, core_pipeline_parallel)),
    ])
    return patches
