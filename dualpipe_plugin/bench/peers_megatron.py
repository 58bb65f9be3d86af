"""Megatron-Core entries of ``bench compare``: Megatron's 1F1B and interleaved (VP=2) schedules, and our
dualpipev through ``dualpipe_plugin.megatron`` (its ``get_forward_backward_func``), on the emulated model.

Megatron-Core runs on CPU/gloo in :func:`dualpipe_plugin.megatron.enable_cpu_mode` (the explicit opt-in).
Its schedules need no GPTModel: a model chunk is an ``EmulatedMegatronChunk``
(:mod:`dualpipe_plugin.bench.megatron_chunk`), a ``MegatronModule`` holding the chunk's
:class:`~dualpipe_plugin.runtime.emulate.EmulatedLayer` slice, with what the schedules ask of a chunk
(``config``, ``set_input_tensor``, ``pre_process``/``post_process``).
Activations are ``[rows, 1, dim]`` (Megatron's ``[seq, micro-batch, hidden]``: ``seq_length = rows``,
``micro_batch_size = 1``). ``forward_step_func`` returns the chunk's output and an MSE loss function in
the ``(loss, report)`` form. Stages: 1F1B 4 × 2 layers; interleaved 8 stages of 1 layer, Megatron's
placement (chunk v of rank r is stage v·P + r); ours 8 stages of 1 layer in the V (the plugin's
placement). Only the schedule function is timed (no DDP wrapper, no optimizer, no
``finalize_model_grads``: they are the same for all three); ``batch_p2p_comm=False`` as on gloo.
"""

from __future__ import annotations

from functools import partial

import torch

from dualpipe_plugin.bench.megatron_chunk import emulated_megatron_chunk_class
from dualpipe_plugin.bench.workload import ActivationProbe, Job, RankReport, emulated_layers, timed_steps

__all__ = ["run_megatron_rank", "emulated_forward_step"]

SCHEDULES = ("1f1b", "interleaved", "ours")


def _loss(target, output):
    loss = (output - target).pow(2).mean()
    return loss, {"loss": loss.detach()}


def emulated_forward_step(data_iterator, model):
    """Megatron's ``forward_step_func`` for an emulated chunk: its output and an MSE loss in the
    ``(loss, report)`` form."""
    x, y = next(data_iterator)
    return model(x), partial(_loss, y)


def run_megatron_rank(rank: int, world_size: int, job: Job) -> RankReport:
    """One rank; options: ``schedule`` (1f1b, interleaved, ours) and ``ours`` (our schedule name)."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    from dualpipe_plugin.megatron import enable_cpu_mode

    workload = job.workload
    kind = job.option("schedule")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    P = workload.ranks
    vp = 2 if kind == "interleaved" else None
    with enable_cpu_mode():
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=P, virtual_pipeline_model_parallel_size=vp)
        try:
            config = TransformerConfig(
                num_layers=workload.layers, hidden_size=workload.dim, num_attention_heads=4,
                pipeline_model_parallel_size=P, virtual_pipeline_model_parallel_size=vp,
                params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
                batch_p2p_comm=False, overlap_p2p_comm=False, deallocate_pipeline_outputs=False,
            )
            torch.manual_seed(0)
            layers = emulated_layers(workload, workload.layers)
            chunk_class = emulated_megatron_chunk_class()
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            if kind == "ours":
                from dualpipe_plugin.megatron import build_model_chunks, configure_model_config, get_forward_backward_func
                from dualpipe_plugin.megatron.placement import placement_of

                configure_model_config(config, job.option("ours", "dualpipev"))
                placement = placement_of(config)

                def provider(pre_process, post_process, vp_stage=None):
                    where = placement.chunk(pp_rank, vp_stage)
                    mine = layers[where.layer_offset:where.layer_offset + where.num_layers]
                    return chunk_class(config, mine, pre_process=pre_process, post_process=post_process)

                chunks = build_model_chunks(provider, config)
                forward_backward = get_forward_backward_func()
            else:
                from megatron.core.pipeline_parallel import get_forward_backward_func

                per_stage = workload.layers // (P * (vp or 1))
                chunks = []
                for v in range(vp or 1):
                    stage = v * P + pp_rank
                    chunks.append(chunk_class(config, layers[stage * per_stage:(stage + 1) * per_stage],
                                              pre_process=stage == 0, post_process=stage == P * (vp or 1) - 1))
                forward_backward = get_forward_backward_func()
            x, y = workload.batch()
            rows = workload.rows
            micro_batches = [(a.unsqueeze(1), b.unsqueeze(1)) for a, b in zip(x.split(rows), y.split(rows))]
            probe = ActivationProbe(chunks)

            def step():
                for chunk in chunks:
                    chunk.zero_grad(set_to_none=True)
                iterators = [iter(micro_batches) for _ in chunks]
                forward_backward(
                    forward_step_func=emulated_forward_step,
                    data_iterator=iterators if len(chunks) > 1 else iterators[0],
                    model=chunks if len(chunks) > 1 else chunks[0],
                    num_microbatches=workload.microbatches, seq_length=rows, micro_batch_size=1,
                    forward_only=False,
                )

            timing = timed_steps(step, workload, probe)
            function = type(forward_backward).__name__ if kind == "ours" else forward_backward.__name__
            return RankReport(timing, probe.peak, {"function": function})
        finally:
            parallel_state.destroy_model_parallel()
