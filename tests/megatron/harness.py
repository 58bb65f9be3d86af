"""Test helpers: a tiny Megatron-Core GPT on CPU/gloo, driven by Megatron's own schedules.

The Megatron parts run inside the ranks of :func:`dualpipe_plugin.launch.run_local` (a gloo world),
with :func:`dualpipe_plugin.megatron.enable_cpu_mode` active; the specs and comparisons run anywhere.
Usage (as in ``tests/megatron/test_cpu_mode.py``)::

    spec = RunSpec(model=TinyGPT(num_layers=4), parallel=Parallel(pp=2), num_microbatches=4)
    got = merge_results(run_local(run_megatron, 2, args=(spec,)))
    ref = merge_results(run_local(run_megatron, 1, args=(reference_spec(spec),)))
    assert got.microbatch_losses == ref.microbatch_losses
    compare_grads(got.grads[0], ref.grads[0], exact=True, approx={TIED_EMBEDDING})

The pieces, in the order a test uses them:

- :func:`init_parallel` builds Megatron's ``parallel_state`` on the gloo world for (tp, pp, vp, ep) and
  seeds torch plus Megatron's RNG tracker (``model_parallel_cuda_manual_seed``, CPU states in CPU mode).
- :func:`build_model` builds one ``GPTModel`` chunk per virtual stage from ``get_gpt_layer_local_spec``
  (no Transformer Engine, no apex) with ``pre_process``/``post_process`` set for the chunk, then
  overwrites every parameter from a generator seeded by the parameter's *global* name, so that any
  pipeline / expert layout starts from the same weights as the single-process reference.
- :func:`make_batches` / :func:`data_iterator` give synthetic, deterministic micro-batches keyed by
  (iteration, global micro-batch index).
- :func:`forward_step` is Megatron-LM's ``forward_step_func`` convention (output tensor + loss-function
  partial returning ``(loss_sum, num_tokens, {'lm loss': [loss_sum, num_tokens]})``).
- :func:`run_megatron` runs N iterations of ``get_forward_backward_func()`` under Megatron's DDP wrapper
  and ``finalize_model_grads`` (optionally ``get_megatron_optimizer`` steps), returning per-iteration loss
  as Megatron-LM's ``train_step`` reports it and every gradient keyed by a stable global name
  (``decoder.layers.{global_layer}.…``, ``…local_experts.{global_expert}.…``).
- :func:`merge_results` joins the ranks' pieces; :func:`reference_spec` turns a spec into the
  unpipelined single-process reference (PP=1, EP=1, DP=1, all DP micro-batches in one process).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Iterator

import numpy as np

__all__ = [
    "TIED_EMBEDDING",
    "Parallel",
    "TinyGPT",
    "RunSpec",
    "RankResult",
    "Merged",
    "init_parallel",
    "destroy_parallel",
    "transformer_config",
    "build_model",
    "gpt_provider",
    "global_param_names",
    "make_batches",
    "data_iterator",
    "forward_step",
    "loss_func",
    "run_megatron",
    "run_megatron_specs",
    "merge_results",
    "reference_spec",
    "compare_grads",
    "max_abs_diff",
]


TIED_EMBEDDING = "embedding.word_embeddings.weight"
"""Global name of the word embedding; with tied embeddings the last stage's output-layer copy too."""

# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True, kw_only=True, slots=True)
class Parallel:
    """Megatron parallel sizes; data parallel is whatever the world size leaves over."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None
    """Virtual pipeline size (model chunks per pipeline rank); ``None`` = non-interleaved."""
    ep: int = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class TinyGPT:
    """A GPT small enough for 2–4 CPU ranks (fp32, local spec)."""

    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 4
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    seq_length: int = 16
    micro_batch_size: int = 2
    share_embeddings: bool = True
    """Tie word embedding and output layer (exercises the embedding group across PP)."""
    num_moe_experts: int | None = None
    """``None``: dense MLP. Otherwise MoE in every layer with the alltoall token dispatcher."""
    moe_router_topk: int = 2
    seed: int = 1234


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """One run of Megatron's schedule on the gloo world."""

    model: TinyGPT = field(default_factory=TinyGPT)
    parallel: Parallel = field(default_factory=Parallel)
    num_microbatches: int = 4
    """Micro-batches per data-parallel rank per iteration."""
    iterations: int = 1
    optimizer: bool = False
    """Step Megatron's optimizer (``get_megatron_optimizer``, Adam) after each iteration."""
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    lr: float = 1e-2
    clip_grad: float = 1.0
    """Megatron's default gradient clipping (global L2 norm)."""
    config_overrides: tuple[tuple[str, Any], ...] = ()
    """Extra ``TransformerConfig`` fields, e.g. ``(("overlap_p2p_comm", True),)``."""
    schedule: str | None = None
    """``None``: Megatron's own ``get_forward_backward_func()``. Otherwise a dualpipe_plugin schedule
    (``dualpipev``, ``dualpipe``, ``1f1b``, ``zb1p``): the config is configured for it, the model built by
    ``build_model_chunks`` and the step run by the plugin's ``get_forward_backward_func()``."""
    shared_iterator: bool = False
    """Pass one data iterator for all chunks of a rank instead of one per chunk."""
    forward_only: bool = False
    """Evaluate (``forward_only=True``): losses only, no gradients."""


@dataclass(frozen=True, slots=True)
class RankResult:
    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    is_last_stage: bool
    losses: list[float]
    """Per iteration, as Megatron-LM's ``train_step`` reports 'lm loss' (token-weighted, DP-reduced);
    empty unless ``is_last_stage``."""
    microbatch_losses: list[list[float]]
    """Per iteration (last stage only), each micro-batch's token-mean loss ``loss_sum / num_tokens``
    (the schedule backpropagates that divided again by the number of micro-batches)."""
    grads: list[dict[str, np.ndarray]]
    """Per iteration, ``{global name: gradient}`` of the parameters this rank holds (after
    ``finalize_model_grads``). Empty with the distributed optimizer (only a shard is reduced)."""


@dataclass(frozen=True, slots=True)
class Merged:
    losses: list[float]
    microbatch_losses: list[list[float]]
    grads: list[dict[str, np.ndarray]]


# ------------------------------------------------------------------------------------ parallel state


def init_parallel(parallel: Parallel, seed: int, *, gloo_groups: bool = False) -> None:
    """Initialise ``parallel_state`` for ``parallel`` on the (already initialised) gloo world; seed RNGs.

    ``gloo_groups`` creates Megatron's extra ``*_GLOO`` groups, which ``get_megatron_optimizer`` uses
    by default (``use_gloo_process_groups=True``); the default backend here is gloo already.
    """
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


def transformer_config(tiny: TinyGPT, parallel: Parallel, **overrides):
    """The ``TransformerConfig`` for ``tiny`` under ``parallel``: fp32, no fusions, no dropout.

    Pipeline communication defaults to what works on gloo: ``batch_p2p_comm=False`` (see
    :mod:`dualpipe_plugin.megatron.cpu_mode`, "Pipeline settings on gloo").
    """
    import torch
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=tiny.num_layers,
        hidden_size=tiny.hidden_size,
        num_attention_heads=tiny.num_attention_heads,
        ffn_hidden_size=tiny.ffn_hidden_size,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vp,
        expert_model_parallel_size=parallel.ep,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        batch_p2p_comm=False,
        overlap_p2p_comm=False,
        deallocate_pipeline_outputs=False,
    )
    if tiny.num_moe_experts is not None:
        kwargs.update(
            num_moe_experts=tiny.num_moe_experts,
            moe_router_topk=tiny.moe_router_topk,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_ffn_hidden_size=tiny.ffn_hidden_size,
            # Megatron-Core 0.16.1's SequentialMLP expert adds its bias in place to the (as-is
            # returned) output of _ReduceFromModelParallelRegion at TP=1, which autograd forbids on any
            # device; MoE models (DeepSeek, Mixtral) have no linear biases anyway.
            add_bias_linear=False,
        )
    kwargs.update(overrides)
    if parallel.pp == 2 and parallel.vp is not None and kwargs["batch_p2p_comm"]:
        raise ValueError(
            "batch_p2p_comm=True with PP=2 and interleaving swaps activations and gradients silently "
            "(both directions go to the one peer in one batch); use batch_p2p_comm=False"
        )
    return TransformerConfig(**kwargs)


def _stable_seed(base: int, name: str) -> int:
    return (base * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def global_param_names(chunk) -> dict[str, str]:
    """``{local parameter name: global name}`` for one model chunk (optionally DDP-wrapped).

    Local names count layers and experts from 0 on each rank; global names use the transformer layer's
    own ``layer_number`` (1-based, offset included) minus one and the expert's global index, so
    gradients from different pipeline / expert layouts can be compared key by key. When the word
    embedding is tied, the last stage's ``output_layer.weight`` copy is named like the embedding.
    """
    from megatron.core import parallel_state

    module = getattr(chunk, "module", chunk)
    layer_numbers = [layer.layer_number - 1 for layer in module.decoder.layers]
    names: dict[str, str] = {}
    for name, _ in module.named_parameters():
        global_name = name
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            global_name = f"decoder.layers.{layer_numbers[int(match.group(1))]}.{match.group(2)}"
        match = re.match(r"(.*\.local_experts)\.(\d+)\.(.*)", global_name)
        if match:
            mlp = module.decoder.layers[int(re.match(r"decoder\.layers\.(\d+)", name).group(1))].mlp
            num_local = mlp.num_local_experts
            ep_rank = parallel_state.get_expert_model_parallel_rank()
            global_name = f"{match.group(1)}.{ep_rank * num_local + int(match.group(2))}.{match.group(3)}"
        if name == "output_layer.weight" and module.share_embeddings_and_output_weights:
            global_name = TIED_EMBEDDING
        names[name] = global_name
    return names


def _deterministic_init(chunk, seed: int) -> None:
    import torch

    module = getattr(chunk, "module", chunk)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for local, global_name in global_param_names(module).items():
            param = params[local]
            gen = torch.Generator().manual_seed(_stable_seed(seed, global_name))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "layernorm" in global_name or "norm." in global_name:
                value = (1.0 if global_name.endswith("weight") else 0.0) + 0.1 * noise
            else:
                value = 0.05 * noise
            param.copy_(value.to(param.dtype))


def gpt_provider(tiny: TinyGPT, config):
    """Megatron-LM's ``model_provider(pre_process, post_process, vp_stage)`` for ``tiny``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=tiny.num_moe_experts, moe_grouped_gemm=False)

    def provider(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=tiny.vocab_size,
            max_sequence_length=tiny.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=tiny.share_embeddings,
            vp_stage=vp_stage,
        )
        _deterministic_init(chunk, tiny.seed)
        return chunk

    return provider


def build_model(tiny: TinyGPT, parallel: Parallel, config, schedule: str | None = None) -> list:
    """One ``GPTModel`` per virtual stage on this rank, ``pre_process``/``post_process`` per chunk.

    With a dualpipe_plugin ``schedule`` the config is configured for it and the chunks come from
    ``build_model_chunks`` (the plugin's placement); otherwise Megatron's placement is used.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if schedule is not None:
        from dualpipe_plugin.megatron import build_model_chunks, configure_model_config

        configure_model_config(config, schedule)
        return build_model_chunks(gpt_provider(tiny, config), config)
    spec = get_gpt_layer_local_spec(num_experts=tiny.num_moe_experts, moe_grouped_gemm=False)
    chunks = []
    for vp_stage in range(parallel.vp or 1):
        vp = vp_stage if parallel.vp is not None else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=tiny.vocab_size,
            max_sequence_length=tiny.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=tiny.share_embeddings,
            vp_stage=vp,
        )
        _deterministic_init(chunk, tiny.seed)
        chunks.append(chunk)
    return chunks


# ---------------------------------------------------------------------------------------------- data


def make_batches(tiny: TinyGPT, iteration: int, first_microbatch: int, count: int) -> list[dict]:
    """``count`` micro-batches numbered from ``first_microbatch`` (global index) in ``iteration``."""
    import torch

    batches = []
    for mb in range(first_microbatch, first_microbatch + count):
        gen = torch.Generator().manual_seed(_stable_seed(tiny.seed, f"data/{iteration}/{mb}"))
        shape = (tiny.micro_batch_size, tiny.seq_length + 1)
        stream = torch.randint(0, tiny.vocab_size, shape, generator=gen)
        loss_mask = (torch.rand(tiny.micro_batch_size, tiny.seq_length, generator=gen) > 0.2).float()
        loss_mask[:, 0] = 1.0  # never an all-masked micro-batch
        batches.append(
            dict(
                tokens=stream[:, :-1].contiguous(),
                labels=stream[:, 1:].contiguous(),
                loss_mask=loss_mask,
                position_ids=torch.arange(tiny.seq_length).unsqueeze(0).expand(shape[0], -1).contiguous(),
            )
        )
    return batches


def data_iterator(batches: list[dict]) -> Iterator[dict]:
    return iter(list(batches))


# ------------------------------------------------------------------------------- forward step / loss


def loss_func(loss_mask, output_tensor):
    """Megatron-LM's GPT loss convention: ``(sum of masked losses, num_tokens, report)``.

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


def forward_step(data_iterator, model):
    """Megatron's ``forward_step_func``: returns the model output and a loss-function partial."""
    batch = next(data_iterator)
    # attention_mask=None: the local spec's causal softmax builds its own mask.
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


# ----------------------------------------------------------------------------------------------- run


def run_megatron(rank: int, world_size: int, spec: RunSpec) -> RankResult:
    """One rank of ``spec``: Megatron's own schedule, DDP wrapper and ``finalize_model_grads``."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dualpipe_plugin.megatron import enable_cpu_mode

    with enable_cpu_mode():
        par, tiny = spec.parallel, spec.model
        init_parallel(par, tiny.seed, gloo_groups=spec.optimizer)
        try:
            config = transformer_config(tiny, par, **dict(spec.config_overrides))
            chunks = build_model(tiny, par, config, spec.schedule)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=False,
                overlap_grad_reduce=spec.overlap_grad_reduce,
                use_distributed_optimizer=spec.distributed_optimizer,
            )
            model = [
                DistributedDataParallel(
                    config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0)
                )
                for i, chunk in enumerate(chunks)
            ]
            if spec.overlap_grad_reduce:
                no_sync = [m.no_sync for m in model]
                config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            config.finalize_model_grads_func = finalize_model_grads

            optimizer = None
            if spec.optimizer:
                from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

                optimizer = get_megatron_optimizer(
                    OptimizerConfig(
                        optimizer="adam",
                        lr=spec.lr,
                        weight_decay=0.0,
                        clip_grad=spec.clip_grad,
                        use_distributed_optimizer=spec.distributed_optimizer,
                    ),
                    model,
                )

            dp_rank = parallel_state.get_data_parallel_rank()
            is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            names = [global_param_names(m) for m in model]
            if spec.schedule is None:
                forward_backward = get_forward_backward_func()
            else:
                from dualpipe_plugin.megatron import get_forward_backward_func as plugin_forward_backward

                forward_backward = plugin_forward_backward()  # dispatches on config.pipeline_schedule

            losses, mb_losses, grads = [], [], []
            for it in range(spec.iterations):
                for m in model:
                    m.zero_grad_buffer()
                if optimizer is not None:
                    optimizer.zero_grad()
                first = dp_rank * spec.num_microbatches  # global micro-batch numbering
                batches = make_batches(tiny, it, first, spec.num_microbatches)
                iterators = [data_iterator(batches) for _ in model]
                store = forward_backward(
                    forward_step_func=forward_step,
                    data_iterator=iterators if len(model) > 1 and not spec.shared_iterator else iterators[0],
                    model=model if len(model) > 1 else model[0],
                    num_microbatches=spec.num_microbatches,
                    seq_length=tiny.seq_length,
                    micro_batch_size=tiny.micro_batch_size,
                    forward_only=spec.forward_only,
                )
                # With the distributed optimizer each DP rank holds only its reduce-scattered shard
                # of the gradient buffer; the rest is this rank's unreduced local sum. Not comparable.
                no_grads = spec.distributed_optimizer or spec.forward_only
                grads.append({} if no_grads else _collect_grads(model, names))
                if is_last:
                    reports = torch.stack([d["lm loss"] for d in store]).sum(dim=0)
                    torch.distributed.all_reduce(
                        reports, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
                    )
                    losses.append(float(reports[0] / reports[1]))
                    mb_losses.append([float(d["lm loss"][0] / d["lm loss"][1]) for d in store])
                if optimizer is not None:
                    ok, _, _ = optimizer.step()
                    if not ok:
                        raise RuntimeError(f"optimizer step skipped at iteration {it}")
            return RankResult(
                rank=rank,
                pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                dp_rank=dp_rank,
                ep_rank=parallel_state.get_expert_model_parallel_rank(),
                is_last_stage=is_last,
                losses=losses,
                microbatch_losses=mb_losses,
                grads=grads,
            )
        finally:
            destroy_parallel()


def run_megatron_specs(rank: int, world_size: int, specs: tuple[RunSpec, ...]) -> list[RankResult]:
    """Several specs one after the other in the same processes (saves a launch: imports cost ~10 s)."""
    return [run_megatron(rank, world_size, spec) for spec in specs]


def _collect_grads(model, names) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for chunk, chunk_names in zip(model, names):
        for local, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None:
                continue
            value = grad.detach().clone().numpy()
            name = chunk_names[local]
            # Two chunks of one rank can hold copies of one parameter (a V's tied embedding on rank 0).
            assert name not in out or np.array_equal(out[name], value), f"local copies of {name} differ"
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------- merge


def merge_results(results: list[RankResult]) -> Merged:
    """Join per-rank results: losses from the last stage, gradients from every pipeline/expert rank.

    A name held by several ranks (data-parallel replicas, the tied embedding's two copies) must carry
    bit-identical gradients, else ``AssertionError``.
    """
    last = [r for r in results if r.is_last_stage]
    losses = last[0].losses
    for r in last[1:]:
        assert r.losses == losses, f"last-stage ranks disagree on the reported loss: {r.losses} vs {losses}"
    microbatch_losses = [
        [x for r in sorted(last, key=lambda r: r.dp_rank) for x in r.microbatch_losses[i]]
        for i in range(len(losses))
    ]
    # Data-parallel replicas after finalize_model_grads hold the same reduced gradient; keep one per name.
    iterations = len(results[0].grads)
    grads: list[dict[str, np.ndarray]] = []
    for it in range(iterations):
        merged: dict[str, np.ndarray] = {}
        for r in results:
            for name, g in r.grads[it].items():
                if name in merged:
                    assert np.array_equal(merged[name], g), f"rank {r.rank}: copies of {name} differ"
                else:
                    merged[name] = g
        grads.append(merged)
    return Merged(losses=losses, microbatch_losses=microbatch_losses, grads=grads)


def reference_spec(spec: RunSpec, data_parallel: int = 1) -> RunSpec:
    """The unpipelined single-process reference of ``spec`` run on ``data_parallel`` DP ranks.

    All ``data_parallel × num_microbatches`` micro-batches go through one process in order, so the loss
    scaling (``/ tokens / M`` then the DP average) equals the distributed run's.
    """
    return replace(
        spec,
        parallel=Parallel(),
        num_microbatches=spec.num_microbatches * data_parallel,
        distributed_optimizer=False,
        overlap_grad_reduce=False,
    )


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.max(np.abs(a[k] - b[k]))) for k in a}


def compare_grads(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    *,
    exact: bool,
    approx: frozenset[str] | set[str] = frozenset(),
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    """Assert the same names and equal gradients: bit-for-bit when ``exact`` (except names in
    ``approx``), else ``np.allclose(rtol, atol)``."""
    assert sorted(got) == sorted(want), (
        f"names differ: only got {sorted(set(got) - set(want))}, only want {sorted(set(want) - set(got))}"
    )
    bad = []
    for name in sorted(want):
        if exact and name not in approx:
            if not np.array_equal(got[name], want[name]):
                bad.append(f"{name}: max |diff| {np.max(np.abs(got[name] - want[name])):.3g}")
        elif not np.allclose(got[name], want[name], rtol=rtol, atol=atol):
            bad.append(f"{name}: max |diff| {np.max(np.abs(got[name] - want[name])):.3g}")
    assert not bad, f"{len(bad)} of {len(want)} gradients differ:\n" + "\n".join(bad)
