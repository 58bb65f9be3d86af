"""Calling the PipelineModule from a chunk: when DeepSpeed's module forward hooks can be left out.

``DeepSpeedEngine.__init__`` registers a forward pre-hook and a forward hook on the module
(``_forward_prologue`` / ``_forward_epilogue``); TrainSchedule's ``module(...)`` call runs them on every
micro-batch, and so do our chunks when they call the module. What they do, item by item:

* ``see_memory_usage`` before and after (prints only with ``"memory_breakdown": true``);
* the flops profiler's start and stop at its profile step (``"flops_profiler": {"enabled": true}``);
* random-LTD's sequence update (``"data_efficiency"``'s random_ltd);
* the forward wall-clock timers (under our schedules :mod:`telemetry` counts forward work per action
  instead and empties that list);
* ZeRO-3's parameter bookkeeping (pipelines refuse ZeRO-3);
* fp16 ``auto_cast`` of the inputs (``"fp16": {"auto_cast": true}``);
* ``tput_timer.start()`` when no training dataloader was given: a restart at every forward, so
  DeepSpeed's samples/sec counts from the last forward on; our engine starts it at the step's start.

With none of those configured they only restart the throughput timer, yet cost about 0.1 ms per call
right after an idle wait (cold code), on the critical path of every F op. :func:`hooks_idle` says when
that is the case, and no one else hooked the module (its own hook dicts hold only DeepSpeed's two
hooks, no global module hooks, no ``torch.compile``); the chunks then call ``module.forward`` directly.
Activation checkpointing and layer seeding live in ``PipelineModule.forward`` itself and are kept.
"""

from __future__ import annotations

from torch.nn.modules import module as torch_module

__all__ = ["hooks_idle"]


def _only_deepspeeds(hooks: dict, handle) -> bool:
    return handle is not None and list(hooks) == [handle.id]


def hooks_idle(engine) -> bool:
    """True when skipping DeepSpeed's forward hooks on ``engine.module`` changes nothing but the
    throughput timer's start (module docstring)."""
    module = engine.module
    features = (
        engine.memory_breakdown(), engine.flops_profiler_enabled(), engine.random_ltd_enabled(),
        engine.fp16_auto_cast(), engine.zero_optimization_partition_weights(),
        engine.autotuning_profile_model_info(), bool(engine.engine_timers.forward_timers),
    )
    if any(features):
        return False
    foreign = (
        module._backward_hooks or module._backward_pre_hooks or module._compiled_call_impl is not None
        or getattr(torch_module, "_global_forward_pre_hooks", None) or getattr(torch_module, "_global_forward_hooks", None)
        or getattr(torch_module, "_global_backward_hooks", None)
        or getattr(torch_module, "_global_backward_pre_hooks", None)
    )
    return not foreign and _only_deepspeeds(module._forward_pre_hooks, engine.module_forward_pre_hook) and \
        _only_deepspeeds(module._forward_hooks, engine.module_forward_post_hook)
