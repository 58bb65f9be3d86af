"""``--pipeline-schedule`` for Megatron-style command lines, and ``patch_megatron_lm()`` for Megatron-LM.

For Megatron-LM's own ``pretrain_gpt.py`` (Megatron-LM is not installed in this repository's CI; what is
tested is listed below)::

    import dualpipe_plugin.megatron as dpm
    dpm.patch_megatron_lm()            # before pretrain(...); e.g. at the top of pretrain_gpt.py
    # then: torchrun ... pretrain_gpt.py <Megatron-LM args> --pipeline-schedule dualpipev

or, without editing Megatron-LM: ``python -m dualpipe_plugin.megatron.run_megatron_lm pretrain_gpt.py ...``.

What :func:`patch_megatron_lm` changes (each a binding in Megatron-LM's ``megatron.training`` package,
replaced in the defining module and in every loaded ``megatron.*`` / ``__main__`` module that imported it
by name; :meth:`MegatronLMPatch.undo` restores them):

1. ``arguments.parse_args``: the ``extra_args_provider`` passed to ``pretrain`` is chained with
   :func:`add_pipeline_schedule_args`, so ``--pipeline-schedule`` parses alongside Megatron-LM's flags.
2. ``arguments.validate_args``: after Megatron-LM's own validation, :func:`apply_schedule_args` refuses
   bad combinations (unknown schedule; a virtual pipeline size set with dualpipe/dualpipev; layers not
   divisible into the stages; too few micro-batches) and, for dualpipe/dualpipev, sets
   ``args.virtual_pipeline_model_parallel_size = 2``: Megatron-LM then builds two chunks per rank
   (``model_provider(..., vp_stage=0/1)``), one data iterator per chunk, per-chunk DDP, no_sync and
   grad/param-sync functions, and ``model0``/``model1`` checkpoint entries, exactly as for interleaving.
3. ``arguments.core_transformer_config_from_args``: the returned config is marked with
   ``config.pipeline_schedule`` and checked (:func:`~dualpipe_plugin.megatron.placement.check_model_config`);
   this switches on the placement hooks (layer numbers) for that config.
4. ``training.get_model``: the model provider gets our ``pre_process``/``post_process`` for each
   ``vp_stage`` (a V has both ends on rank 0), and after the chunks are built the copies that must start
   equal are made equal (tied embedding; DualPipe's mirrored stages).
5. ``training.get_forward_backward_func`` and ``megatron.core.pipeline_parallel.get_forward_backward_func``:
   this package's registry, which picks the function from ``config.pipeline_schedule`` on each call
   (``megatron``, the default, gives Megatron's own).

Tested here (``tests/megatron/test_args.py``): the parser flag, :func:`apply_schedule_args` on a
Megatron-LM-like namespace, and the five bindings above against stand-in ``megatron.training`` modules
that call them the way Megatron-LM does (from memory of Megatron-LM ~0.12-0.14). Not tested: a real
Megatron-LM ``pretrain()`` run (its exact call signatures, data iterators, checkpointing and logging).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from dualpipe_plugin.megatron.errors import MegatronScheduleError, UnknownScheduleError
from dualpipe_plugin.megatron.registry import MEGATRON, default_registry

__all__ = [
    "MegatronLMPatch",
    "add_pipeline_schedule_args",
    "apply_schedule_args",
    "patch_megatron_lm",
]


def add_pipeline_schedule_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider`` convention: add ``--pipeline-schedule`` and return the parser."""
    names = default_registry().names()
    group = parser.add_argument_group(title="dualpipe_plugin pipeline schedule")
    group.add_argument(
        "--pipeline-schedule", type=str.lower, default=MEGATRON, choices=names,
        help="pipeline-parallel schedule: 'megatron' (default: Megatron-Core's 1F1B or interleaved), "
             "'dualpipev' (2P stages in a V), 'dualpipe' (P stages, bidirectional, 2x parameters), "
             "'1f1b' or 'zb1p' (this plugin's runtime)",
    )
    return parser


def apply_schedule_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check Megatron-LM-style ``args`` for ``args.pipeline_schedule``; for dualpipe/dualpipev set the
    virtual pipeline size to 2 (two chunks per rank). Idempotent. Raises :class:`MegatronScheduleError`."""
    from dualpipe_plugin.megatron.placement import TWO_CHUNK_SCHEDULES, ModelPlacement
    from dualpipe_plugin.schedules import ScheduleConfigError, build_schedule, schedule_names

    name = (getattr(args, "pipeline_schedule", MEGATRON) or MEGATRON).lower()
    if name not in default_registry().names():
        raise UnknownScheduleError(
            f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(default_registry().names())}"
        )
    if name == MEGATRON or name not in schedule_names() or getattr(args, "_dualpipe_applied", None) == name:
        return args  # Megatron's own, or a registered function that checks its own settings
    pp = args.pipeline_model_parallel_size
    if name in TWO_CHUNK_SCHEDULES:
        vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
        per_vp = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
        if vp is not None or per_vp is not None:
            raise MegatronScheduleError(
                f"--pipeline-schedule {name} places two chunks per rank itself; remove "
                f"--virtual-pipeline-model-parallel-size / --num-layers-per-virtual-pipeline-stage"
            )
        ModelPlacement(name, pp, args.num_layers)
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
            build_schedule(name, pp, microbatches)
        except ScheduleConfigError as error:
            raise MegatronScheduleError(
                f"{error} (--global-batch-size {gbs} / (--micro-batch-size {mbs} x data-parallel size {dp}) "
                f"= {microbatches} micro-batches per step): raise --global-batch-size"
            ) from None
    if name in TWO_CHUNK_SCHEDULES:
        args.virtual_pipeline_model_parallel_size = 2
    args._dualpipe_applied = name
    return args


# ------------------------------------------------------------------------------------ Megatron-LM


@dataclass
class MegatronLMPatch:
    """Undo handle of :func:`patch_megatron_lm`."""

    applied: list[tuple[Any, str, Any]] = field(default_factory=list)

    def undo(self) -> None:
        for owner, attr, original in reversed(self.applied):
            setattr(owner, attr, original)
        self.applied.clear()


def _rebind(patch: MegatronLMPatch, home: Any, attr: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``home.attr`` and every loaded by-name import of it (megatron.* and __main__)."""
    original = getattr(home, attr)
    replacement = make(original)
    owners = [home] + [
        module for name, module in list(sys.modules.items())
        if module is not None and module is not home and (name.startswith("megatron.") or name == "__main__")
        and getattr(module, attr, None) is original
    ]
    for owner in owners:
        patch.applied.append((owner, attr, original))
        setattr(owner, attr, replacement)


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
        from dualpipe_plugin.megatron.placement import (
            TWO_CHUNK_SCHEDULES,
            check_model_config,
            install_placement_hooks,
        )

        config = original(args, *rest, **kwargs)
        name = getattr(args, "pipeline_schedule", MEGATRON) or MEGATRON
        config.pipeline_schedule = name
        if name != MEGATRON:
            check_model_config(config, name)
            if name in TWO_CHUNK_SCHEDULES:
                install_placement_hooks()
        return config

    return core_transformer_config_from_args


def _get_model_hook(original: Callable) -> Callable:
    def get_model(model_provider_func, *args, **kwargs):
        from megatron.training.global_vars import get_args

        from dualpipe_plugin.megatron.placement import (
            TWO_CHUNK_SCHEDULES,
            ModelPlacement,
            synchronize_initial_copies,
        )

        margs = get_args()
        name = getattr(margs, "pipeline_schedule", MEGATRON) or MEGATRON
        if name not in TWO_CHUNK_SCHEDULES:
            return original(model_provider_func, *args, **kwargs)
        from megatron.core import parallel_state

        placement = ModelPlacement(name, margs.pipeline_model_parallel_size, margs.num_layers)
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
    def get_forward_backward_func(pp_size=None, vp_size=None):
        return default_registry().get_forward_backward_func(pp_size, vp_size)

    return get_forward_backward_func


def patch_megatron_lm() -> MegatronLMPatch:
    """Route Megatron-LM's training through ``--pipeline-schedule`` (see the module docstring for what changes).

    Call once, before ``pretrain(...)``. Raises ``ImportError`` naming the fix when Megatron-LM's
    ``megatron.training`` package is not importable.
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

    patch = MegatronLMPatch()
    try:
        _rebind(patch, arguments, "parse_args", _parse_args_hook)
        _rebind(patch, arguments, "validate_args", _validate_args_hook)
        _rebind(patch, arguments, "core_transformer_config_from_args", _config_hook)
        _rebind(patch, training, "get_model", _get_model_hook)
        # Only these two bindings: megatron.core.pipeline_parallel.schedules keeps Megatron's own function,
        # which the registry calls for the 'megatron' schedule.
        for owner in (training, core_pipeline_parallel):
            original = owner.get_forward_backward_func
            patch.applied.append((owner, "get_forward_backward_func", original))
            owner.get_forward_backward_func = _forward_backward_hook(original)
    except BaseException:
        patch.undo()
        raise
    return patch
