"""Rank functions of the planner's benchmarks: run a model cut where a plan says, time it, count its memory.

``benchmarks/planner_calibration.py``, ``planner_memory.py`` and ``planner_cuts.py`` launch these with
:func:`~dualpipe_plugin.launch.run_local`. One :class:`PlannedRun` names the model (a row of layers from
:mod:`dualpipe_plugin.reference`), the schedule, the cut (``boundaries``; None: uniform) and what to
measure. Every step starts after a barrier; a step is ``max(end) - min(start)`` over the ranks. With
``record`` the last step's executor timeline comes back too (per rank, with the rank's start offset), for
the measured-beside-simulated picture. With ``memory`` one more step runs under a
:class:`~dualpipe_plugin.planner.meter.SavedTensorMeter` (its peak, the W store watched) and an AdamW
step follows, so the rank reports what it held: parameters, gradients, optimizer state, activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "PlannedRun", "MODELS", "EmulatedHeavyEnds", "emulated_layer_costs", "emulated_heavy_ends", "mse_loss",
    "model_layers", "run_planned_rank", "run_planned_deepspeed_rank", "run_planned_megatron_rank",
    "MoERun", "moe_profile_rank", "run_moe_rank",
]

MODELS = ("uniform8", "emulated_heavy", "heavy")
"""uniform8: 8 emulated layers, F = I = W = 10 ms each (the workload of ``bench compare``); heavy:
:mod:`dualpipe_plugin.reference.heavy_ends` (real math); emulated_heavy: its twin on the emulated device
(:func:`emulated_heavy_ends`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EmulatedHeavyEnds:
    """The heavy-ends shape on the emulated device: per block F, I, W in ms; the embedding and the head
    ``end_factor`` times that. Every layer is a small Linear+tanh lasting those times (real math on 4
    ranks would fight for 2 cores)."""

    blocks: int = 14
    forward_ms: float = 4.0
    input_grad_ms: float = 4.0
    weight_grad_ms: float = 4.0
    end_factor: float = 3.0
    dim: int = 64
    rows: int = 8


def emulated_layer_costs(config: EmulatedHeavyEnds = EmulatedHeavyEnds()) -> list:
    """The :class:`~dualpipe_plugin.runtime.emulate.EmulatedCosts` of each layer: heavy, light x blocks, heavy."""
    from dualpipe_plugin.runtime.emulate import EmulatedCosts

    light = EmulatedCosts(config.forward_ms / 1e3, config.input_grad_ms / 1e3, config.weight_grad_ms / 1e3)
    heavy = EmulatedCosts(light.forward_s * config.end_factor, light.input_grad_s * config.end_factor,
                          light.weight_grad_s * config.end_factor)
    return [heavy] + [light] * config.blocks + [heavy]


def emulated_heavy_ends(config: EmulatedHeavyEnds = EmulatedHeavyEnds()) -> list:
    """``blocks + 2`` emulated layers (seed 0): heavy, ``blocks`` light, heavy."""
    from dualpipe_plugin.runtime.emulate import EmulatedLayer

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return [EmulatedLayer(config.dim, costs) for costs in emulated_layer_costs(config)]
    finally:
        torch.random.set_rng_state(state)


def mse_loss(output, target):
    return (output - target).pow(2).mean()


@dataclass(frozen=True, kw_only=True)
class PlannedRun:
    model: str
    schedule: str
    microbatches: int = 16
    boundaries: tuple[int, ...] | None = None
    warmup: int = 2
    steps: int = 5
    record: bool = False
    memory: bool = False
    timeout_s: float = 120.0


def model_layers(name: str) -> tuple[list, Any]:
    """(layers, profile target) of a named model (the target profiles the same layers)."""
    from dualpipe_plugin.planner.profile import ProfileTarget
    from dualpipe_plugin.planner.targets import heavy_ends

    if name == "uniform8":
        from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer

        torch.manual_seed(0)
        layers = [EmulatedLayer(64, EmulatedCosts(0.010, 0.010, 0.010)) for _ in range(8)]
        x, y = _dense_batch(1, 8, 64)
        return layers, ProfileTarget.from_layers(layers, x, loss=partial(mse_loss, target=y),
                                                 model="8 emulated layers, F = I = W = 10 ms")
    if name == "emulated_heavy":
        config = EmulatedHeavyEnds()
        layers = emulated_heavy_ends(config)
        x, y = _dense_batch(1, config.rows, config.dim)
        return layers, ProfileTarget.from_layers(
            layers, x, loss=partial(mse_loss, target=y),
            model=f"emulated heavy-ends model ({config.blocks} blocks, ends x{config.end_factor:g})")
    if name == "heavy":
        target = heavy_ends()
        return list(target.layers), target
    raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")


def model_target(name: str) -> Any:
    """The profile target of a named model (picklable as ``partial(model_target, name)``: a spawned
    process builds its own copy, as the runtime-overhead probe on local processes needs)."""
    return model_layers(name)[1]


def _dense_batch(microbatches: int, rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (microbatches * rows, dim)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def _batch_and_loss(name: str, microbatches: int):
    from dualpipe_plugin.reference import heavy_ends

    if name == "heavy":
        config = heavy_ends.HeavyEnds()
        return heavy_ends.batch(config, microbatches), heavy_ends.lm_loss
    rows = 8
    return _dense_batch(microbatches, rows, 64), mse_loss


def _pipeline_step(pipe, chunks, inputs, labels, microbatches: int, record: bool, report: dict):
    """``step(last)`` for :func:`_timed`: one pipeline step; with ``record`` the last one's timeline (and this
    rank's start, to put every rank on one clock) goes into ``report``."""

    def step(last: bool) -> None:
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        started = time.perf_counter()
        result = pipe.step(inputs if pipe.needs_inputs() else None, labels if pipe.needs_labels() else None,
                           num_microbatches=microbatches, reduce_loss=False, record=record and last)
        if record and last:
            report["timeline"] = [(str(action), start, end) for action, start, end in result.timeline]
            report["started"] = started

    return step


def _timed(step, warmup: int, steps: int) -> list[tuple[float, float]]:
    spans = []
    for index in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        step(index == warmup + steps - 1)
        end = time.perf_counter()
        if index >= warmup:
            spans.append((start, end))
    return spans


def run_planned_rank(rank: int, world_size: int, run: PlannedRun) -> dict:
    from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules

    torch.manual_seed(0)
    layers, _ = model_layers(run.model)
    chunks = stage_modules(layers, run.schedule, num_ranks=world_size, rank=rank, boundaries=run.boundaries)
    (x, y), loss_fn = _batch_and_loss(run.model, run.microbatches)
    pipe = DualPipeline(chunks, run.schedule, loss_fn=loss_fn, timeout_s=run.timeout_s, overlap=False)
    report: dict = {}
    step = _pipeline_step(pipe, chunks, x, y, run.microbatches, run.record, report)
    report["spans"] = _timed(step, run.warmup, run.steps)
    if run.memory:
        report["memory"] = _measure_memory(pipe, chunks, x, y, run)
    pipe.close()
    return report


def _measure_memory(pipe, chunks, x, y, run: PlannedRun) -> dict:
    """One more step under the meter, then an AdamW step: what this rank held, by kind (bytes)."""
    from dualpipe_plugin.planner.meter import SavedTensorMeter, tensor_bytes

    params = list({id(p): p for chunk in chunks for p in chunk.parameters()}.values())
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    meter = SavedTensorMeter(exclude=[*params, x, y])
    meter.watch_store(pipe.executor.store)
    with meter.counting():
        pipe.step(x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
                  num_microbatches=run.microbatches, reduce_loss=False)
    meter.unwatch_store(pipe.executor.store)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    return {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(tensor_bytes(list(state.values())) for state in optimizer.state.values()),
        "activations": meter.peak,
        "left_after_step": meter.live,
    }


# ------------------------------------------------------------------------ the same cut through the frameworks


def run_planned_deepspeed_rank(rank: int, world_size: int, run: PlannedRun) -> dict:
    """The emulated heavy-ends model as a DeepSpeed ``PipelineModule`` of ``LayerSpec(EmulatedLayer)``, our
    engine with ``"partition_method": "boundaries:..."`` (the plan's cut); a step is one ``train_batch``
    (SGD, fp32, ZeRO off: DeepSpeed's reductions and optimizer step included)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 20 s JIT build of an unused op
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    import dualpipe_plugin.deepspeed  # noqa: F401  (our engine)
    from dualpipe_plugin.runtime.emulate import EmulatedLayer

    if run.model != "emulated_heavy":
        raise ValueError("the DeepSpeed run builds the emulated heavy-ends model only")
    deepspeed.init_distributed(dist_backend="gloo")
    config = EmulatedHeavyEnds()
    torch.manual_seed(0)
    specs = [LayerSpec(EmulatedLayer, config.dim, costs) for costs in emulated_layer_costs(config)]
    model = PipelineModule(layers=specs, num_stages=world_size, loss_fn=mse_loss, partition_method="uniform")
    bounds = run.boundaries or None
    method = "boundaries:" + ",".join(map(str, bounds)) if bounds else "uniform"
    ds_config = {
        "train_micro_batch_size_per_gpu": config.rows, "gradient_accumulation_steps": run.microbatches,
        "train_batch_size": config.rows * run.microbatches, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
        "pipeline": {"schedule": run.schedule, "partition_method": method, "timeout_s": run.timeout_s},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    x, y = _dense_batch(run.microbatches, config.rows, config.dim)
    micro_batches = list(zip(x.split(config.rows), y.split(config.rows)))
    spans = _timed(lambda last: engine.train_batch(iter(micro_batches)), run.warmup, run.steps)
    return {"spans": spans, "parts": list(engine.module.parts)}


def run_planned_megatron_rank(rank: int, world_size: int, run: PlannedRun) -> dict:
    """The emulated heavy-ends model as Megatron chunks (each profiled layer counted as one transformer layer),
    the plan's cut given as ``configure_model_config(config, NAME, stage_layers=...)`` and read back through
    the plugin's placement; a step is one call of the plugin's ``get_forward_backward_func()``."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    from dualpipe_plugin.bench.megatron_chunk import emulated_megatron_chunk_class
    from dualpipe_plugin.bench.peers_megatron import emulated_forward_step
    from dualpipe_plugin.megatron import (
        build_model_chunks, configure_model_config, enable_cpu_mode, get_forward_backward_func,
    )
    from dualpipe_plugin.megatron.placement import placement_of

    if run.model != "emulated_heavy":
        raise ValueError("the Megatron run builds the emulated heavy-ends model only")
    model_config = EmulatedHeavyEnds()
    layers = emulated_heavy_ends(model_config)
    with enable_cpu_mode():
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
        try:
            config = TransformerConfig(
                num_layers=len(layers), hidden_size=model_config.dim, num_attention_heads=4,
                pipeline_model_parallel_size=world_size, params_dtype=torch.float32, pipeline_dtype=torch.float32,
                use_cpu_initialization=True, batch_p2p_comm=False, overlap_p2p_comm=False,
                deallocate_pipeline_outputs=False,
            )
            bounds = run.boundaries
            counts = tuple(b - a for a, b in zip(bounds, bounds[1:])) if bounds else None
            configure_model_config(config, run.schedule, stage_layers=counts, timeout_s=run.timeout_s)
            placement = placement_of(config)
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            chunk_class = emulated_megatron_chunk_class()

            def provider(pre_process, post_process, vp_stage=None):
                where = placement.chunk(pp_rank, vp_stage)
                mine = layers[where.layer_offset:where.layer_offset + where.num_layers]
                return chunk_class(config, mine, pre_process=pre_process, post_process=post_process)

            chunks = build_model_chunks(provider, config)
            forward_backward = get_forward_backward_func()
            x, y = _dense_batch(run.microbatches, model_config.rows, model_config.dim)
            rows = model_config.rows
            micro_batches = [(a.unsqueeze(1), b.unsqueeze(1)) for a, b in zip(x.split(rows), y.split(rows))]

            def step(last: bool) -> None:
                for chunk in chunks:
                    chunk.zero_grad(set_to_none=True)
                forward_backward(
                    forward_step_func=emulated_forward_step, data_iterator=[iter(micro_batches) for _ in chunks],
                    model=chunks, num_microbatches=run.microbatches, seq_length=rows, micro_batch_size=1,
                    forward_only=False,
                )

            spans = _timed(step, run.warmup, run.steps)
            held = [(c.layer_offset, c.num_layers) for c in placement.chunks(pp_rank)]
            return {"spans": spans, "held": held}
        finally:
            parallel_state.destroy_model_parallel()


# ------------------------------------------------------------------------------------------ MoE, P x EP


@dataclass(frozen=True, kw_only=True)
class MoERun:
    """The reference MoE model (``bench compare``'s MoE workload) on P pipeline ranks x EP = 2."""

    schedule: str = "dualpipev"
    ranks: int = 2
    blocks: int = 4
    microbatches: int = 16
    warmup: int = 2
    steps: int = 5
    record: bool = False


def _moe_workload(run: MoERun):
    from dualpipe_plugin.bench.workload import MoEWorkload, Workload

    return Workload(ranks=run.ranks, microbatches=run.microbatches, layers=run.blocks, moe=MoEWorkload(),
                    warmup=run.warmup, steps=run.steps)


def moe_profile_rank(rank: int, world_size: int, run: MoERun) -> dict:
    """Every process of the P x EP layout profiles the model, the two of each EP group in lock step (the
    blocks' all-to-alls need the peer), so the machine is as busy as during the run; rank 0's profile is
    the cost file. The embedding and head attach to the first and last block, as ``moe_chunks`` places them.
    The runtime overhead is measured on each replica's pipeline group, both replicas at once (stage p of
    both exchanges its all-to-alls over the same EP group)."""
    from dualpipe_plugin.bench.peers_deepspeed import DeepSpeedMoEBlock
    from dualpipe_plugin.bench.workload import moe_setup
    from dualpipe_plugin.moe import Embedding, Head, lm_loss
    from dualpipe_plugin.planner.profile import ProfileTarget, profile_model
    from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups

    workload = _moe_workload(run)
    setup = moe_setup(workload)
    config, costs = workload.moe.model, workload.layer_costs()
    torch.manual_seed(0)
    blocks = [DeepSpeedMoEBlock(config, setup.ep, costs) for _ in range(run.blocks)]
    layers = [Embedding(config), *blocks, Head(config)]
    tokens, labels = workload.batch(seed=rank)
    rows = workload.moe.batch
    target = ProfileTarget(layers=layers, inputs=tokens[:rows], loss=partial(_on_labels, lm_loss, labels[:rows]),
                           attach=["next"] + [None] * run.blocks + ["previous"],
                           model=f"reference MoE model, {run.blocks} blocks, EP={world_size}, emulated compute")
    groups = new_pipeline_groups(setup.pipelines)
    transport = TorchTransport(setup.pipelines[setup.replica], groups=groups[setup.replica])
    return profile_model(target, transport=transport).to_dict()


def _on_labels(loss_fn, labels, output):
    return loss_fn(output, labels)


def run_moe_rank(rank: int, world_size: int, run: MoERun) -> dict:
    from dualpipe_plugin.bench.workload import moe_block_wrapper, moe_model, moe_setup
    from dualpipe_plugin.moe import lm_loss, moe_chunks
    from dualpipe_plugin.runtime.pipeline import DualPipeline
    from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups

    workload = _moe_workload(run)
    setup = moe_setup(workload)
    groups = new_pipeline_groups(setup.pipelines)
    transport = TorchTransport(setup.pipelines[setup.replica], groups=groups[setup.replica])
    model = moe_model(workload, setup.ep)
    chunks = moe_chunks(model, run.schedule, run.ranks, setup.stage_rank, wrap=moe_block_wrapper(workload))
    pipe = DualPipeline(chunks, run.schedule, loss_fn=lm_loss, transport=transport, overlap=False,
                        timeout_s=workload.timeout_s)
    tokens, labels = workload.batch(seed=setup.replica)
    report: dict = {}
    step = _pipeline_step(pipe, chunks, tokens, labels, run.microbatches, run.record, report)
    report["spans"] = _timed(step, run.warmup, run.steps)
    report["replica"], report["stage_rank"] = setup.replica, setup.stage_rank
    pipe.close()
    return report
