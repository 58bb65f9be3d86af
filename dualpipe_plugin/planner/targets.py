"""Ready :class:`~dualpipe_plugin.planner.profile.ProfileTarget` s of the reference models, for trying the
planner (and what the README's commands profile)::

    dualpipe-plugin profile --model dualpipe_plugin.planner.targets:heavy_ends --out costs.json
    dualpipe-plugin profile --model dualpipe_plugin.planner.targets:megatron_gpt --out costs.json

A target of your own is a function of no arguments returning a ``ProfileTarget``: your layers (or your
``PipelineModule`` / Megatron ``model_provider``), one micro-batch, the loss.
"""

from __future__ import annotations

from functools import partial

__all__ = ["heavy_ends", "megatron_gpt"]


def _loss_on(loss_fn, labels, output):
    return loss_fn(output, labels)


def heavy_ends():
    """The real-math heavy-ends model (:mod:`dualpipe_plugin.reference.heavy_ends`), one micro-batch."""
    from dualpipe_plugin.planner.profile import ProfileTarget
    from dualpipe_plugin.reference.heavy_ends import HeavyEnds, batch, heavy_ends_layers, lm_loss

    config = HeavyEnds()
    tokens, labels = batch(config, 1)
    return ProfileTarget.from_layers(heavy_ends_layers(config), tokens, loss=partial(_loss_on, lm_loss, labels),
                                     model=f"heavy-ends model (vocab {config.vocab}, {config.blocks} blocks)")


def megatron_gpt():
    """The reference Megatron-Core GPT (8 layers) from its ``model_provider``, on this process: starts a
    one-process gloo world and Megatron's ``parallel_state`` (pipeline size 1) when none is running, and
    Megatron's CPU mode when there is no GPU."""
    import torch
    import torch.distributed as dist

    from dualpipe_plugin.planner.profile import ProfileTarget
    from dualpipe_plugin.reference.megatron_gpt import (
        Parallel, TinyGPT, init_parallel, learnable_batch, model_provider, transformer_config,
    )

    if not dist.is_initialized():
        from dualpipe_plugin.launch import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not torch.cuda.is_available():
        from dualpipe_plugin.megatron import enable_cpu_mode

        enable_cpu_mode()
    tiny = TinyGPT(num_layers=8)
    init_parallel(Parallel(), tiny.seed)
    config = transformer_config(tiny, Parallel(), cpu=not torch.cuda.is_available())
    return ProfileTarget.from_megatron(model_provider(tiny, config), config, learnable_batch(tiny, 0, 0),
                                       model="reference Megatron-Core GPT, 8 layers")
