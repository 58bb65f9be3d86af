"""A tiny GPT on Megatron-Core: the one reference model that ``launch/pretrain_gpt.py`` trains and the
Megatron tests and benchmarks build.

Its room is what Megatron-LM's ``pretrain_gpt.py`` hands a schedule: the ``TransformerConfig``
(:func:`transformer_config`), ``model_provider(pre_process, post_process, vp_stage)``
(:func:`model_provider`), a batch (:func:`learnable_batch`), ``forward_step`` and ``loss_func``, for a
``GPTModel`` of Megatron's local layers (Transformer Engine's on request) small enough for CPU ranks. How
the model is trained (DDP, optimizer, checkpoints) belongs to its callers; layout-independent parameter
names and weights are in :mod:`dualpipe_plugin.reference.megatron_names`. Importing this module imports
neither torch nor Megatron-Core: they load inside the functions.

>>> model, parallel = TinyGPT(num_layers=4), Parallel(pp=2)
>>> init_parallel(parallel, model.seed)                       # inside a running torch.distributed world
>>> config = transformer_config(model, parallel)               # fp32, CPU/gloo settings
>>> chunks = megatron_placement_chunks(model_provider(model, config), parallel.vp)
>>> batch = learnable_batch(model, iteration=0, microbatch=0)  # what forward_step reads
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

__all__ = [
    "TinyGPT",
    "Parallel",
    "init_parallel",
    "destroy_parallel",
    "transformer_config",
    "model_provider",
    "megatron_placement_chunks",
    "batch_from_stream",
    "learnable_batch",
    "loss_func",
    "forward_step",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class TinyGPT:
    """The model's sizes (defaults: small enough for 2–4 CPU ranks) and the seed of its weights and data."""

    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 4
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = 64
    """``None``: 4 × ``hidden_size``."""
    seq_length: int = 16
    max_position_embeddings: int | None = None
    """``None``: ``seq_length``."""
    micro_batch_size: int = 2
    share_embeddings: bool = True
    """Tie word embedding and output layer (exercises the embedding group across PP)."""
    num_moe_experts: int | None = None
    """``None``: dense MLP. Otherwise MoE in every layer with the alltoall token dispatcher."""
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 1e-2
    transformer_impl: str = "local"
    """``local`` (Megatron's own layers; runs on CPU) or ``transformer_engine``."""
    seed: int = 1234


@dataclass(frozen=True, kw_only=True, slots=True)
class Parallel:
    """Megatron parallel sizes; data parallel is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None
    """Virtual pipeline size (model chunks per pipeline rank); ``None`` = non-interleaved."""
    ep: int = 1


# ------------------------------------------------------------------------------------ parallel state


def init_parallel(parallel: Parallel, seed: int, *, gloo_groups: bool = False) -> None:
    """Initialise ``parallel_state`` for ``parallel`` on the (already initialised) world; seed torch, numpy
    and Megatron's RNG tracker (reset, so that several runs in one process start alike).

    ``gloo_groups`` creates Megatron's extra ``*_GLOO`` groups, which ``get_megatron_optimizer`` uses
    by default (``use_gloo_process_groups=True``).
    """
    import numpy as np
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vp,
        expert_model_parallel_size=parallel.ep,
        create_gloo_process_groups=gloo_groups,
    )
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


# --------------------------------------------------------------------------------------------- model


def transformer_config(model: TinyGPT, parallel: Parallel, *, bf16: bool = False, cpu: bool = True, **overrides):
    """The ``TransformerConfig`` of ``model`` under ``parallel``: no fusions, no dropout, fp32 (or bf16).

    ``cpu`` (CPU/gloo) initialises on the CPU and keeps the two pipeline directions apart
    (``batch_p2p_comm=False``, see :mod:`dualpipe_plugin.megatron.cpu_mode`, "Pipeline settings on gloo");
    without it (NCCL) pipeline communication follows Megatron-LM's defaults. ``overrides`` are further
    ``TransformerConfig`` fields. Megatron's interleaved schedule at PP=2 batches both directions to its one
    peer and swaps them, so ``batch_p2p_comm`` is off there and asking for it is refused.
    """
    import torch
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    ffn_hidden_size = model.ffn_hidden_size or 4 * model.hidden_size
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vp,
        expert_model_parallel_size=parallel.ep,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=cpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        batch_p2p_comm=not cpu,
        overlap_p2p_comm=False,
        deallocate_pipeline_outputs=not cpu,
    )
    if model.num_moe_experts is not None:
        kwargs.update(
            num_moe_experts=model.num_moe_experts,
            moe_router_topk=model.moe_router_topk,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_ffn_hidden_size=ffn_hidden_size,
            # Megatron-Core 0.16.1's SequentialMLP expert adds its bias in place to the (as-is
            # returned) output of _ReduceFromModelParallelRegion at TP=1, which autograd forbids on any
            # device; MoE models (DeepSeek, Mixtral) have no linear biases anyway.
            add_bias_linear=False,
        )
    if parallel.pp == 2 and parallel.vp is not None:
        if overrides.get("batch_p2p_comm"):
            raise ValueError(
                "batch_p2p_comm=True with PP=2 and interleaving swaps activations and gradients silently "
                "(both directions go to the one peer in one batch); use batch_p2p_comm=False"
            )
        kwargs["batch_p2p_comm"] = False
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def model_provider(model: TinyGPT, config, *, init: Callable[[Any, int], None] | None = None):
    """Megatron-LM's ``model_provider(pre_process, post_process, vp_stage)`` for ``model``.

    ``init(chunk, model.seed)``, when given, sets each new chunk's weights (e.g.
    :func:`~dualpipe_plugin.reference.megatron_names.init_for_comparison`); otherwise they are
    Megatron's own initialisation.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if model.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=model.num_moe_experts, moe_grouped_gemm=False)
    else:
        spec = get_gpt_layer_local_spec(num_experts=model.num_moe_experts, moe_grouped_gemm=False)

    def provider(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings or model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model.share_embeddings,
            vp_stage=vp_stage,
        )
        if init is not None:
            init(chunk, model.seed)
        return chunk

    return provider


def megatron_placement_chunks(provider: Callable[..., Any], vp: int | None) -> list:
    """This rank's chunks under Megatron's own placement: one, or ``vp`` interleaved (chunk v is stage
    v·P + pipeline rank), ``pre_process``/``post_process`` from ``parallel_state``."""
    from megatron.core import parallel_state

    return [
        provider(
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        for vp_stage in (range(vp) if vp else [None])
    ]


# ---------------------------------------------------------------------------------------------- data


def batch_from_stream(stream, loss_mask) -> dict:
    """Megatron-LM's GPT batch from ``[batch, seq + 1]`` token streams: tokens, next-token labels, the
    ``[batch, seq]`` loss mask and position ids."""
    import torch

    size, length = loss_mask.shape
    return dict(
        tokens=stream[:, :-1].contiguous(),
        labels=stream[:, 1:].contiguous(),
        loss_mask=loss_mask,
        position_ids=torch.arange(length).unsqueeze(0).expand(size, -1).contiguous(),
    )


def learnable_batch(model: TinyGPT, iteration: int, microbatch: int) -> dict:
    """Global micro-batch ``microbatch`` of ``iteration``: each sequence counts up from a random start by a
    random step, modulo the vocabulary, so the loss can fall; the same on every rank and layout."""
    import torch

    gen = torch.Generator().manual_seed(model.seed * 1_000_003 + iteration * 10_007 + microbatch)
    size, length, vocab = model.micro_batch_size, model.seq_length, model.vocab_size
    start = torch.randint(0, vocab, (size, 1), generator=gen)
    step = torch.randint(1, 5, (size, 1), generator=gen)
    stream = (start + step * torch.arange(length + 1)) % vocab
    return batch_from_stream(stream, torch.ones(size, length))


# ------------------------------------------------------------------------------- forward step / loss


def loss_func(loss_mask, output_tensor):
    """Megatron-LM's GPT convention: ``(sum of masked losses, num_tokens, {'lm loss': [sum, tokens]})``.

    With ``config.calculate_per_token_loss=False`` the schedule divides the first element by
    ``num_tokens`` and by the number of micro-batches before backward.
    """
    import torch

    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron-LM's ``forward_step``: the output and a ``loss_func`` partial. Only chunks that hold the
    embedding or the loss read a batch; attention_mask=None (the local spec's causal softmax builds it).
    ``return_schedule_plan``: Megatron's schedule-plan convention (its combined 1F1B, this package's
    overlap path): the model's ``build_schedule_plan`` of the same inputs instead of the output."""
    from megatron.core.utils import get_attr_wrapped_model

    module = get_attr_wrapped_model(model, "pre_process", return_model_obj=True)
    run = model.build_schedule_plan if return_schedule_plan else model
    if module.pre_process or module.post_process:
        batch = next(data_iterator)
        output = run(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])
    return run(None, None, None), partial(loss_func, None)
