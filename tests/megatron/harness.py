"""Test helpers: the reference tiny Megatron-Core GPT on CPU/gloo, driven by Megatron's own schedules or
the plugin's.

The model, its config, ``forward_step``/``loss_func`` and ``parallel_state`` set-up come from
:mod:`dualpipe_plugin.reference.megatron_gpt` (shared with ``launch/pretrain_gpt.py`` and the benchmarks);
this module adds what only tests need. The Megatron parts run inside the ranks of
:func:`dualpipe_plugin.launch.run_local` (a gloo world), with :func:`dualpipe_plugin.megatron.enable_cpu_mode`
active; the specs and comparisons run anywhere. Usage (as in ``tests/megatron/test_cpu_mode.py``)::

    spec = RunSpec(model=TinyGPT(num_layers=4), parallel=Parallel(pp=2), num_microbatches=4)
    got = merge_results(run_local(run_megatron, 2, args=(spec,)))
    ref = merge_results(run_local(run_megatron, 1, args=(reference_spec(spec),)))
    assert got.microbatch_losses == ref.microbatch_losses
    compare_grads(got.grads[0], ref.grads[0], exact=True, approx={TIED_EMBEDDING})

The pieces, in the order a test uses them:

- :func:`build_model` builds this rank's ``GPTModel`` chunks (Megatron's placement, or the plugin's for a
  plugin schedule) and overwrites every parameter from a generator seeded by the parameter's *global*
  name (:func:`~dualpipe_plugin.reference.megatron_names.init_for_comparison`), so that any pipeline /
  expert layout starts from the same weights as the single-process reference.
- :func:`make_batches` / :func:`data_iterator` give random, deterministic micro-batches with a random loss
  mask, keyed by (iteration, global micro-batch index).
- :func:`run_megatron` runs N iterations of ``get_forward_backward_func()`` under Megatron's DDP wrapper
  and ``finalize_model_grads`` (optionally ``get_megatron_optimizer`` steps), returning per-iteration loss
  as Megatron-LM's ``train_step`` reports it and every gradient keyed by a stable global name
  (``decoder.layers.{global_layer}.…``, ``…local_experts.{global_expert}.…``).
- :func:`merge_results` joins the ranks' pieces; :func:`reference_spec` turns a spec into the
  unpipelined single-process reference (PP=1, EP=1, DP=1, all DP micro-batches in one process).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np

from dualpipe_plugin.reference.megatron_gpt import (
    Parallel,
    TinyGPT,
    batch_from_stream,
    destroy_parallel,
    forward_step,
    init_parallel,
    megatron_placement_chunks,
    model_provider,
    transformer_config,
)
from dualpipe_plugin.reference.megatron_names import global_param_names, init_for_comparison, name_seeded_generator

__all__ = [
    "RunSpec",
    "RankResult",
    "Merged",
    "build_model",
    "make_batches",
    "data_iterator",
    "run_megatron",
    "run_megatron_specs",
    "merge_results",
    "reference_spec",
    "compare_grads",
    "max_abs_diff",
]

# --------------------------------------------------------------------------------------------- specs


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
    overlap: bool = False
    """With a dualpipe_plugin schedule: F&B pairs through the overlap engine (``overlap=True``)."""
    stage_layers: tuple[int, ...] | None = None
    """Transformer layers per stage for a two-chunk plugin schedule (``configure_model_config(stage_layers=)``)."""


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
    hidden_transfers: int = 0
    """With ``overlap``: expert all-to-alls of one side of an F&B pair during which the other side's
    compute ran (from the overlap engine's trace)."""


@dataclass(frozen=True, slots=True)
class Merged:
    losses: list[float]
    microbatch_losses: list[list[float]]
    grads: list[dict[str, np.ndarray]]
    hidden_transfers: int = 0
    """Summed over ranks: expert all-to-alls hidden behind the other side of an F&B pair."""


# --------------------------------------------------------------------------------------------- model


def build_model(tiny: TinyGPT, parallel: Parallel, config, schedule: str | None = None, **options) -> list:
    """This rank's chunks of ``tiny`` (weights :func:`init_for_comparison`), ``pre_process``/``post_process``
    per chunk.

    With a dualpipe_plugin ``schedule`` the config is configured for it and the chunks come from
    ``build_model_chunks`` (the plugin's placement); otherwise Megatron's placement is used.
    """
    provider = model_provider(tiny, config, init=init_for_comparison)
    if schedule is None:
        return megatron_placement_chunks(provider, parallel.vp)
    from dualpipe_plugin.megatron import build_model_chunks, configure_model_config

    configure_model_config(config, schedule, **options)
    return build_model_chunks(provider, config)


# ---------------------------------------------------------------------------------------------- data


def make_batches(tiny: TinyGPT, iteration: int, first_microbatch: int, count: int) -> list[dict]:
    """``count`` micro-batches numbered from ``first_microbatch`` (global index) in ``iteration``: random
    tokens and a random loss mask (about 80% of the tokens count; never none)."""
    import torch

    batches = []
    for mb in range(first_microbatch, first_microbatch + count):
        gen = name_seeded_generator(tiny.seed, f"data/{iteration}/{mb}")
        stream = torch.randint(0, tiny.vocab_size, (tiny.micro_batch_size, tiny.seq_length + 1), generator=gen)
        loss_mask = (torch.rand(tiny.micro_batch_size, tiny.seq_length, generator=gen) > 0.2).float()
        loss_mask[:, 0] = 1.0  # never an all-masked micro-batch
        batches.append(batch_from_stream(stream, loss_mask))
    return batches


def data_iterator(batches: list[dict]) -> Iterator[dict]:
    return iter(list(batches))


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
            options = {"overlap": True} if spec.overlap else {}
            if spec.stage_layers is not None:
                options["stage_layers"] = spec.stage_layers
            chunks = build_model(tiny, par, config, spec.schedule, **options)
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

            trace = _trace_pairs(spec, model) if spec.overlap else None
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
                hidden_transfers=_hidden_transfers(trace) if trace is not None else 0,
            )
        finally:
            destroy_parallel()


def _trace_pairs(spec: RunSpec, model: list) -> list:
    """Start tracing the overlap engine of the plugin's pipeline for ``model`` (made now: collective)."""
    from dualpipe_plugin.megatron.registry import default_registry

    pipeline = default_registry().lookup(spec.schedule).pipeline_for(model)
    assert pipeline.executor.overlap is not None, "overlap asked for but no overlap engine"
    pipeline.executor.overlap.trace = []
    return pipeline.executor.overlap.trace


def _hidden_transfers(trace: list) -> int:
    """Dispatch/combine all-to-alls of one side during which a compute sub-stage of the other side ran."""
    count = 0
    for comm in trace:
        if comm.what != "comm" or not comm.stage.endswith(("dispatch", "combine")):
            continue
        count += any(
            other.what == "compute" and other.side[0] != comm.side[0]
            and comm.start <= other.start and other.end <= comm.end
            for other in trace
        )
    return count


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
    return Merged(losses=losses, microbatch_losses=microbatch_losses, grads=grads,
                  hidden_transfers=sum(r.hidden_transfers for r in results))


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
