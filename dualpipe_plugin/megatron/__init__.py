"""Megatron-Core adapter: DualPipe, DualPipeV, 1F1B and ZB1P as one flag of a Megatron training loop.

>>> from dualpipe_plugin.megatron import configure_model_config, build_model_chunks, get_forward_backward_func
>>> configure_model_config(config, "dualpipev")              # before building the model
>>> model = build_model_chunks(model_provider, config)       # this rank's two chunks, then wrap in DDP
>>> forward_backward = get_forward_backward_func()           # reads config.pipeline_schedule per call
>>> losses = forward_backward(forward_step_func=..., data_iterator=..., model=model, num_microbatches=...,
...                           seq_length=..., micro_batch_size=..., forward_only=False)

Modules: :mod:`~dualpipe_plugin.megatron.registry` (``register_schedule``, ``get_forward_backward_func``),
:mod:`~dualpipe_plugin.megatron.schedule_fn` (our forward-backward function on the shared runtime),
:mod:`~dualpipe_plugin.megatron.model_config` (``configure_model_config``: the schedule and its options on a
config), :mod:`~dualpipe_plugin.megatron.config_checks` (what a schedule refuses in a config),
:mod:`~dualpipe_plugin.megatron.placement` (V / mirrored layer numbering, pre/post-process, embeddings),
:mod:`~dualpipe_plugin.megatron.grads` (no_sync, mirror sync, embedding tie, finalize_model_grads),
:mod:`~dualpipe_plugin.megatron.weight_split` (B/W split of Megatron's parallel linears),
:mod:`~dualpipe_plugin.megatron.args` (``--pipeline-schedule`` and the other flags),
:mod:`~dualpipe_plugin.megatron.lm_patch` (``patch_megatron_lm()`` for Megatron-LM's training code),
:mod:`~dualpipe_plugin.megatron.patching` (the one room where Megatron bindings are replaced),
:mod:`~dualpipe_plugin.megatron.cpu_mode` (the explicit CPU/gloo opt-in for CI and laptops).
Importing this package imports neither torch nor Megatron-Core; the heavy names load on first use.
"""

from dualpipe_plugin.megatron.args import add_pipeline_schedule_args
from dualpipe_plugin.megatron.config_checks import check_model_config
from dualpipe_plugin.megatron.cpu_mode import CpuMode, cpu_mode_patches, enable_cpu_mode, is_cpu_mode_active
from dualpipe_plugin.megatron.errors import MegatronScheduleError, UnknownScheduleError
from dualpipe_plugin.megatron.lm_patch import patch_megatron_lm
from dualpipe_plugin.megatron.model_config import configure_model_config
from dualpipe_plugin.megatron.patching import Patch, PatchSet
from dualpipe_plugin.megatron.placement import ModelPlacement, build_model_chunks
from dualpipe_plugin.megatron.registry import (
    ScheduleRegistry,
    get_forward_backward_func,
    register_schedule,
    schedule_names,
)

__all__ = [
    "CpuMode",
    "MegatronScheduleError",
    "ModelPlacement",
    "Patch",
    "PatchSet",
    "PipelineScheduleFunction",
    "ScheduleRegistry",
    "UnknownScheduleError",
    "add_pipeline_schedule_args",
    "build_model_chunks",
    "check_model_config",
    "configure_model_config",
    "cpu_mode_patches",
    "enable_cpu_mode",
    "get_forward_backward_func",
    "is_cpu_mode_active",
    "patch_megatron_lm",
    "register_schedule",
    "schedule_names",
]


def __getattr__(name: str):
    if name == "PipelineScheduleFunction":  # imports torch and the runtime
        from dualpipe_plugin.megatron.schedule_fn import PipelineScheduleFunction

        return PipelineScheduleFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
