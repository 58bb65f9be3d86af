"""What ``DeepSpeedEngine.forward`` does around a model's forward, for chunks that the schedule runs without it.

DeepSpeed's PipelineEngine runs each micro-batch's stage through ``DeepSpeedEngine.forward``; the schedule's
chunks call the ``PipelineModule`` itself (or, on the overlap path, its layers' sub-stages). Each thing that
forward (and the module hooks it installs) does is either honoured here or refused at ``initialize``:

=====================================  ==========================================================================
DeepSpeed's forward behaviour          under a schedule
=====================================  ==========================================================================
``torch_autocast`` (its dtype; the     honoured: :func:`forward_context` enters ``autocast_if_enabled(engine)``,
lower-precision-safe modules)          DeepSpeed's own context, around every chunk forward; the safe-module list
                                       acts at ``initialize`` (gradient communication dtype), after the rebuild
output hooks that divide the loss by   honoured: the engine divides each micro-batch loss as
gradient_accumulation_steps            ``DeepSpeedEngine.backward`` does (``_loss_for_backward``)
the PipelineModule's forward hooks:    honoured on the normal path (the chunks call the module, so its hooks
DeepSpeed's prologue/epilogue          run once per chunk forward, as once per stage forward under
(fp16 ``auto_cast`` of the inputs,     TrainSchedule); on the overlap path (``"overlap": true`` with staged
flops profiler, random-LTD sequence    layers) the module is not called: fp16 ``auto_cast``, ``torch_autocast``,
update, memory_breakdown, forward      ``flops_profiler``, ``random_ltd`` and ``memory_breakdown`` are refused
timers), the script's own hooks        there, and the script's own forward hooks fail the step
``train()`` / ``eval()``               honoured: the chunks are the module's own layers
ZeRO's per-forward backward flag       not needed: the engine runs each backward as DeepSpeed's own
(``clear_backward_seen_flag``)         (``_running_engine_backward``), outside ZeRO's hook counting
autotuning (model-info profiling in    refused (``"autotuning"``): it measures inside ``DeepSpeedEngine.forward``
forward)
DeepCompile (``"compile":              refused: its passes are launched from ``DeepSpeedEngine.forward``
{"deepcompile": true}``),
``engine.compile()``
AutoTP (``tensor_parallel.autotp_size  refused: untested with a re-partitioned PipelineModule
> 1``)
=====================================  ==========================================================================

The data side (``training_data=`` through DeepSpeed's loader, curriculum learning in its sampler) is
DeepSpeed's ``_next_batch``, which the engine calls as PipelineEngine does. DeepSpeed 0.19.8 has no
compression library any more (its config key is refused by DeepSpeed itself); a script that changes the
built layers in its place (an adapter injection) is refused by a schedule that rebuilds them
(:mod:`~dualpipe_plugin.deepspeed.layer_record`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from deepspeed.runtime.torch_autocast import autocast_if_enabled

from dualpipe_plugin.deepspeed.config import DeepSpeedPipelineConfigError

__all__ = ["forward_context", "check_forward_features", "check_forward_hooks", "refuse_compile"]


def forward_context(engine) -> AbstractContextManager:
    """The context ``DeepSpeedEngine.forward`` runs the model in: DeepSpeed's ``torch_autocast``."""
    return autocast_if_enabled(engine)


def check_forward_features(engine, *, schedule: str, staged: bool) -> None:
    """Refuse, at ``initialize``, the config features the schedule's chunks would silently skip."""
    head = f"pipeline.schedule={schedule!r} runs the model without DeepSpeedEngine.forward"
    if engine.autotuning_enabled():
        raise DeepSpeedPipelineConfigError(
            f"{head}, where DeepSpeed's autotuner measures the model; autotune with \"schedule\": \"deepspeed\" "
            f"(or without the key), then set the schedule"
        )
    if engine.is_deepcompile_enabled():
        raise DeepSpeedPipelineConfigError(
            f"{head}, from which DeepCompile launches its passes; set \"compile\": {{\"deepcompile\": false}} or "
            f"leave out \"schedule\""
        )
    if engine.autotp_size() > 1:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={schedule!r} is not supported with AutoTP (tensor_parallel.autotp_size="
            f"{engine.autotp_size()}): use a PipelineModule topology with tensor parallelism, or leave out "
            f"\"schedule\""
        )
    if not staged:
        return
    skipped = [name for name, on in (
        ("torch_autocast", engine.torch_autocast_enabled()),
        ("fp16.auto_cast", engine.fp16_enabled() and engine.fp16_auto_cast()),
        ("flops_profiler", engine.flops_profiler_enabled()),
        ("random_ltd", engine.random_ltd_enabled()),
        ("memory_breakdown", engine.memory_breakdown()),
    ) if on]
    if skipped:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.overlap runs F&B pairs through the overlap engine, which calls the layers' sub-stages, not "
            f"the PipelineModule, so DeepSpeed's forward behaviour for {', '.join(skipped)} would be skipped; set "
            f"\"overlap\": false in the config's \"pipeline\" section, or turn {', '.join(skipped)} off"
        )


def check_forward_hooks(engine, *, staged: bool) -> None:
    """On the overlap path the PipelineModule is not called: refuse the script's own forward hooks on it."""
    if not staged:
        return
    own = {handle.id for handle in (engine.module_forward_pre_hook, engine.module_forward_post_hook) if handle}
    module = engine.module
    theirs = [key for key in (*module._forward_pre_hooks, *module._forward_hooks) if key not in own]
    if theirs:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.overlap runs F&B pairs through the overlap engine, which calls the layers' sub-stages, not "
            f"the PipelineModule, so the {len(theirs)} forward hook(s) registered on engine.module would not run; "
            f"register them on the layers, or set \"overlap\": false in the config's \"pipeline\" section"
        )


def refuse_compile(schedule: str) -> None:
    raise DeepSpeedPipelineConfigError(
        f"engine.compile() is not supported with pipeline.schedule={schedule!r}: DeepSpeed compiles the module it "
        f"runs through DeepSpeedEngine.forward, which the schedule's chunks do not call; compile the layers "
        f"themselves (torch.compile inside the LayerSpec's class), or leave out \"schedule\""
    )
