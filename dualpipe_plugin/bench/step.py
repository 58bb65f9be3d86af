"""Step benchmark: one schedule on the emulated device, measured against the simulator's prediction.

``dualpipe-plugin bench --schedule dualpipev --ranks 4 --microbatches 16 --emulate F=10,B=20,W=10 --json``

Each rank holds emulated chunks whose costs (ms per chunk; B is the full backward) are what the
simulator is given, so ``ratio = measured / simulated`` is the runtime's own overhead. The step time is
``max(end) - min(start)`` over the ranks (one monotonic clock on one machine), after warm-up steps; the
median over the measured steps is reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from dualpipe_plugin.bench.machine import machine_facts
from dualpipe_plugin.bench.spans import step_times_ms
from dualpipe_plugin.launch import run_local
from dualpipe_plugin.runtime.emulate import emulated_chunk
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

__all__ = ["StepBenchConfig", "run_step_bench"]


@dataclass(frozen=True)
class StepBenchConfig:
    schedule: str = "dualpipev"
    ranks: int = 4
    microbatches: int = 16
    forward_ms: float = 10.0
    backward_ms: float = 20.0
    weight_ms: float = 10.0
    layers_per_chunk: int = 2
    dim: int = 64
    tokens_per_microbatch: int = 8
    warmup: int = 2
    steps: int = 5

    def costs(self) -> CostModel:
        return CostModel(F=self.forward_ms, B=self.backward_ms, W=self.weight_ms)


def _rank_main(rank: int, world_size: int, config: StepBenchConfig) -> dict:
    torch.manual_seed(0)
    placement = build_schedule(config.schedule, world_size, config.microbatches).placement
    chunks = [
        emulated_chunk(config.dim, config.layers_per_chunk, config.forward_ms, config.backward_ms, config.weight_ms)
        for _ in range(placement.num_chunks)
    ]
    pipe = DualPipeline(chunks, config.schedule, loss_fn=lambda out, target: (out - target).pow(2).mean())
    n = config.microbatches * config.tokens_per_microbatch
    x = torch.randn(n, config.dim)
    y = torch.randn(n, config.dim)
    spans, peak = [], 0
    for step in range(config.warmup + config.steps):
        dist.barrier()
        start = time.perf_counter()
        result = pipe.step(x, y, num_microbatches=config.microbatches, reduce_loss=False)
        end = time.perf_counter()
        peak = result.peak_activations
        if step >= config.warmup:
            spans.append((start, end))
    pipe.close()
    return {"spans": spans, "peak": peak}


def run_step_bench(config: StepBenchConfig) -> dict:
    schedule = build_schedule(config.schedule, config.ranks, config.microbatches)
    predicted = simulate(schedule, config.costs())
    per_rank = run_local(_rank_main, config.ranks, (config,), timeout_s=120 + 10 * config.steps)
    steps_ms = step_times_ms([r["spans"] for r in per_rank])
    measured = statistics.median(steps_ms)
    return {
        "machine": machine_facts(),
        "benchmark": "step",
        "config": asdict(config),
        "measured_ms": round(measured, 2),
        "simulated_ms": predicted.makespan,
        "ratio": round(measured / predicted.makespan, 4),
        "steps_ms": [round(t, 2) for t in steps_ms],
        "peak_activations_per_rank": [r["peak"] for r in per_rank],
        "simulated_peak_activations_per_rank": list(predicted.peak_activations_per_rank),
    }
