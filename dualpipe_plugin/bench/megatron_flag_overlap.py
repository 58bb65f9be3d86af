"""One rank of ``benchmarks/megatron_flag_overlap.py``: the MoE all-to-all overlap as a Megatron user turns it
on, through the schedule function, off vs on, on the same model and data.

Each process builds the reference GPT (:mod:`dualpipe_plugin.reference.megatron_gpt`: Megatron's local MoE
``TransformerLayer`` s, alltoall dispatcher, weights from
:func:`~dualpipe_plugin.reference.megatron_names.init_for_comparison`) twice, once per setting:
``configure_model_config(config, "dualpipev")`` and ``configure_model_config(config, "dualpipev",
overlap=True)`` (what Megatron-LM's ``--pipeline-schedule dualpipev`` with / without
``--overlap-moe-expert-parallel-comm`` does), each on its own ``TransformerConfig``, built by
``build_model_chunks`` and wrapped in Megatron's ``DistributedDataParallel`` with ``finalize_model_grads``.
The plugin's schedule function keeps one pipeline per model (keyed by its first chunk), so two models are
two pipelines side by side. A step is one call of the plugin's ``get_forward_backward_func()`` (the
forward/backward of every micro-batch, the gradient reduction and ``finalize_model_grads``); no
optimizer (the weights stay equal, so both models see the same loss on the same data). Steps alternate
off / on, every round on the round's own data (:func:`~dualpipe_plugin.reference.megatron_gpt.learnable_batch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["FlagOverlapConfig", "run_flag_overlap_rank"]


@dataclass(frozen=True)
class FlagOverlapConfig:
    hidden: int = 256
    ffn: int = 512
    heads: int = 8
    experts: int = 4
    topk: int = 2
    seq: int = 128
    batch: int = 2
    """Micro-batch size: tokens per micro-batch = seq x batch."""
    layers_per_stage: int = 2
    """Transformer (MoE) layers per stage; dualpipev with PP=2 has 4 stages (2 chunks per rank)."""
    microbatches: int = 8
    """Micro-batches per data-parallel rank per step."""
    vocab: int = 64
    pp: int = 2
    ep: int = 2
    rounds: int = 10
    warmup: int = 2
    """Untimed rounds first (the first builds each model's pipeline: collective)."""

    @property
    def world(self) -> int:
        return self.pp * self.ep

    @property
    def num_layers(self) -> int:
        return 2 * self.pp * self.layers_per_stage


def _tiny(config: FlagOverlapConfig):
    from dualpipe_plugin.reference.megatron_gpt import TinyGPT

    return TinyGPT(vocab_size=config.vocab, hidden_size=config.hidden, ffn_hidden_size=config.ffn,
                   num_attention_heads=config.heads, num_moe_experts=config.experts, moe_router_topk=config.topk,
                   seq_length=config.seq, micro_batch_size=config.batch, num_layers=config.num_layers,
                   share_embeddings=False)


def _build(tiny, par, overlap: bool) -> tuple[list, object]:
    """One model for ``overlap``: its DDP-wrapped chunks (own config, marked for dualpipev) and the config."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from dualpipe_plugin.megatron import build_model_chunks, configure_model_config
    from dualpipe_plugin.reference.megatron_gpt import model_provider, transformer_config
    from dualpipe_plugin.reference.megatron_names import init_for_comparison

    config = transformer_config(tiny, par)
    configure_model_config(config, "dualpipev", **({"overlap": True} if overlap else {}))
    chunks = build_model_chunks(model_provider(tiny, config, init=init_for_comparison), config)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
             for i, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    return model, config


def _hidden_alltoalls(trace) -> tuple[int, int]:
    """(dispatch/combine transfers traced, those during which a compute part of the pair's other side ran)."""
    comms = [e for e in trace if e.what == "comm" and e.stage.endswith(("dispatch", "combine"))]
    hidden = sum(
        any(o.what == "compute" and o.side[0] != c.side[0] and c.start <= o.start and o.end <= c.end for o in trace)
        for c in comms
    )
    return len(comms), hidden


def run_flag_overlap_rank(rank: int, world_size: int, config: FlagOverlapConfig) -> dict:
    """One of the ``pp x ep`` processes (data parallel = what is left: ``ep`` replicas of the dense part).

    Returns this rank's step spans ``{"off": [(start, end)], "on": [...]}`` (``time.perf_counter``), the
    per-round losses on the last pipeline rank, whether every gradient of the last round is bit-identical
    between the two models, the model sizes, and one traced overlapped step's all-to-all count.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dualpipe_plugin.megatron import enable_cpu_mode, get_forward_backward_func
    from dualpipe_plugin.megatron.registry import default_registry
    from dualpipe_plugin.reference.megatron_gpt import (
        Parallel, destroy_parallel, forward_step, init_parallel, learnable_batch,
    )

    tiny = _tiny(config)
    par = Parallel(pp=config.pp, ep=config.ep)
    with enable_cpu_mode():
        init_parallel(par, tiny.seed)
        try:
            models = {False: _build(tiny, par, False)[0], True: _build(tiny, par, True)[0]}
            forward_backward = get_forward_backward_func()  # dispatches on config.pipeline_schedule
            dp_rank = parallel_state.get_data_parallel_rank()
            dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            M = config.microbatches

            def step(overlap: bool, round_: int) -> tuple[float, float, float | None]:
                model = models[overlap]
                for chunk in model:
                    chunk.zero_grad_buffer()
                batches = [learnable_batch(tiny, round_, dp_rank * M + i) for i in range(M)]
                iterators = [iter(list(batches)) for _ in model]
                dist.barrier()
                start = time.perf_counter()
                store = forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=model,
                                         num_microbatches=M, seq_length=config.seq,
                                         micro_batch_size=config.batch, forward_only=False)
                end = time.perf_counter()
                loss = None
                if is_last:  # Megatron-LM's train_step report: token-weighted, averaged over DP
                    report = torch.stack([d["lm loss"] for d in store]).sum(dim=0)
                    dist.all_reduce(report, group=dp_group)
                    loss = float(report[0] / report[1])
                return start, end, loss

            for r in range(config.warmup):
                step(False, -1 - r), step(True, -1 - r)
            spans = {"off": [], "on": []}
            losses = {"off": [], "on": []}
            for r in range(config.rounds):
                for overlap, key in ((False, "off"), (True, "on")):
                    start, end, loss = step(overlap, r)
                    spans[key].append((start, end))
                    losses[key].append(loss)

            # The last round's gradients (after finalize_model_grads) of the two models, parameter by parameter.
            grads_equal = all(
                torch.equal(p_off.main_grad, p_on.main_grad)
                for c_off, c_on in zip(models[False], models[True])
                for p_off, p_on in zip(c_off.module.parameters(), c_on.module.parameters())
            )

            # One more (untimed) overlapped step, traced: did the engine run and hide all-to-alls?
            pipeline = default_registry().lookup("dualpipev").pipeline_for(models[True])
            engine = pipeline.executor.overlap
            traced = hidden = 0
            if engine is not None:
                engine.trace = []
                step(True, config.rounds)
                traced, hidden = _hidden_alltoalls(engine.trace)
                engine.trace = None
            off_engine = default_registry().lookup("dualpipev").pipeline_for(models[False]).executor.overlap

            params = sum(p.numel() for c in models[False] for p in c.module.parameters())
            expert_params = sum(p.numel() for c in models[False] for n, p in c.module.named_parameters()
                                if ".experts." in n)
            return {
                "rank": rank,
                "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                "ep_rank": parallel_state.get_expert_model_parallel_rank(),
                "dp_rank": dp_rank,
                "is_last_stage": is_last,
                "spans": spans,
                "losses": losses,
                "grads_equal": grads_equal,
                "params": params,
                "expert_params": expert_params,
                "overlap_engine": {"off": off_engine is not None, "on": engine is not None},
                "alltoalls_traced": traced,
                "alltoalls_hidden": hidden,
            }
        finally:
            destroy_parallel()
