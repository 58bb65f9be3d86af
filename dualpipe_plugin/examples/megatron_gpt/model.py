"""The Megatron-Core example's model: the reference tiny GPT at the command line's sizes, this rank's chunks
placed by the chosen schedule and wrapped as Megatron-LM's ``get_model`` does (Float16Module for bf16,
then DDP), with ``finalize_model_grads`` on the config."""

from __future__ import annotations

import argparse

from dualpipe_plugin.reference.megatron_gpt import (
    Parallel,
    TinyGPT,
    megatron_placement_chunks,
    model_provider,
    transformer_config,
)
from dualpipe_plugin.reference.megatron_names import init_for_training

__all__ = ["reference_model", "parallel_sizes", "model_config", "build_model"]


def reference_model(args: argparse.Namespace) -> TinyGPT:
    """The reference GPT with the command line's sizes and seed."""
    return TinyGPT(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length,
        max_position_embeddings=args.max_position_embeddings,
        micro_batch_size=args.micro_batch_size,
        share_embeddings=not args.untie_embeddings_and_output_weights,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        transformer_impl=args.transformer_impl,
        seed=args.seed,
    )


def parallel_sizes(args: argparse.Namespace) -> Parallel:
    """TP, PP, the user's virtual pipeline size (Megatron's interleaving) and EP from the command line."""
    return Parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    vp=args.virtual_pipeline_model_parallel_size, ep=args.expert_model_parallel_size)


def model_config(args: argparse.Namespace):
    """The ``TransformerConfig``: bf16 with ``--bf16``; CPU/gloo settings with ``--cpu``, else NCCL's."""
    return transformer_config(reference_model(args), parallel_sizes(args), bf16=args.bf16, cpu=args.cpu)


def build_model(args: argparse.Namespace, config) -> list:
    """This rank's chunks, wrapped as Megatron-LM's ``get_model`` does (Float16Module for bf16, then DDP)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    from dualpipe_plugin.megatron import build_model_chunks, configure_model_config

    configure_model_config(config, args.pipeline_options or args.pipeline_schedule)
    # --layout-independent-init: every chunk is drawn by global names before build_model_chunks makes the
    # copies of a two-chunk placement equal, so all schedules and layouts start from the same model.
    init = init_for_training if args.layout_independent_init else None
    provider = model_provider(reference_model(args), config, init=init)
    if args.pipeline_options is None:  # Megatron's placement, interleaved when asked
        chunks = megatron_placement_chunks(provider, args.virtual_pipeline_model_parallel_size)
    else:
        chunks = build_model_chunks(provider, config)
    if not args.cpu:
        import torch

        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    if args.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model
