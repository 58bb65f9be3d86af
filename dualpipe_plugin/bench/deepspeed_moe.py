"""DeepSpeed's own MoE layer on the emulated device: the model and the rank body of
``benchmarks/deepspeed_moe_overlap.py`` (DeepSpeed TrainSchedule vs our dualpipev with overlap off and on).

The model is what a DeepSpeed user writes: ``LayerSpec`` s of a block that holds a
``deepspeed.moe.layer.MoE`` (DeepSpeed's TopKGate, Experts and all-to-all on its expert-parallel group),
between an input and an output projection. Compute is emulated (``runtime/emulate.py``) so the ranks'
compute runs in parallel on a small box while the all-to-alls are real gloo transfers of DeepSpeed's
``[E, C, M]`` buffers: the block's "attention" and each expert carry an :class:`EmulatedLayer` behind a
low-rank projection (real math stays small next to the emulated time), half of the block's costs on the
attention part and half spread over this rank's experts. The aux loss is computed (the gate runs) but not
trained here: the benchmark times the pipeline, the tests check the gradients.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer

__all__ = ["MoEBenchConfig", "EmulatedMoEBlock", "run_rank"]

ENGINES = ("train_schedule", "ours_overlap_off", "ours_overlap_on")


@dataclass(frozen=True, kw_only=True)
class MoEBenchConfig:
    stages: int = 2
    ep: int = 2
    blocks: int = 4
    micro_batches: int = 8
    micro_batch: int = 4
    seq: int = 32
    hidden: int = 1024
    experts: int = 4
    top_k: int = 2
    capacity_factor: float = 2.0
    forward_ms: float = 10.0
    backward_ms: float = 20.0
    weight_ms: float = 10.0
    """Per block: forward, full backward (input part = backward - weight), weight part."""
    rank: int = 8
    """Width of the low-rank path into each emulated layer."""
    rounds: int = 6
    warmup: int = 2
    timeout_s: float = 300.0

    @property
    def world(self) -> int:
        return self.stages * self.ep


class _LowRankEmulated(nn.Module):
    """``Linear(hidden, r) -> EmulatedLayer(r) -> Linear(r, hidden)``: the emulated costs, little real math."""

    def __init__(self, hidden: int, rank: int, costs: EmulatedCosts):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.body = EmulatedLayer(rank, costs)
        self.up = nn.Linear(rank, hidden)

    def forward(self, x):
        return self.up(self.body(self.down(x)))


class EmulatedMoEBlock(nn.Module):
    """``h = x + attn(norm(x)); y = MoE(norm2(h)); return h + y`` with DeepSpeed's MoE layer."""

    def __init__(self, config: MoEBenchConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE

        half = EmulatedCosts.per_layer(config.forward_ms / 2, config.backward_ms / 2, config.weight_ms / 2, 1)
        local = config.experts // config.ep
        per_expert = EmulatedCosts.per_layer(config.forward_ms / 2, config.backward_ms / 2, config.weight_ms / 2,
                                             local)
        self.norm1 = nn.LayerNorm(config.hidden)
        self.attn = _LowRankEmulated(config.hidden, config.rank, half)
        self.norm2 = nn.LayerNorm(config.hidden)
        self.moe = MoE(config.hidden, _LowRankEmulated(config.hidden, config.rank, per_expert),
                       num_experts=config.experts, ep_size=config.ep, k=config.top_k,
                       capacity_factor=config.capacity_factor, eval_capacity_factor=config.capacity_factor,
                       min_capacity=0, use_rts=False, top2_2nd_expert_sampling=False)

    def forward(self, x):
        h = x + self.attn(self.norm1(x))
        y, _, _ = self.moe(self.norm2(h))
        return h + y


class _Projection(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.proj(x)


def _mse(output, target):
    return (output - target).pow(2).mean()


def run_rank(rank: int, world: int, config: MoEBenchConfig) -> dict:
    """Build the three engines on the same model (same seed) and time their steps, interleaved."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 20 s JIT build of an unused op
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    import dualpipe_plugin.deepspeed as plugin

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    specs = ([LayerSpec(_Projection, config.hidden)]
             + [LayerSpec(EmulatedMoEBlock, config) for _ in range(config.blocks)]
             + [LayerSpec(_Projection, config.hidden)])

    def build(kind: str):
        torch.manual_seed(0)
        ours = kind != "train_schedule"
        (plugin.register if ours else plugin.unregister)()  # before the module: it records its partition
        model = PipelineModule(layers=specs, topology=PipeDataParallelTopology(num_pp=config.stages, num_dp=config.ep),
                               loss_fn=_mse, partition_method="type:EmulatedMoEBlock")
        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch,
            "gradient_accumulation_steps": config.micro_batches,
            "train_batch_size": config.micro_batch * config.micro_batches * config.ep,
            "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
            "steps_per_print": 10**9,
        }
        if ours:
            ds_config["pipeline"] = {"schedule": "dualpipev", "overlap": kind == "ours_overlap_on",
                                     "timeout_s": config.timeout_s}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        return engine

    engines = {kind: build(kind) for kind in ENGINES}
    generator = torch.Generator().manual_seed(1 + dist.get_rank() % config.ep)
    shape = (config.micro_batch, config.seq, config.hidden)
    batches = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
               for _ in range(config.micro_batches)]

    spans: dict[str, list[tuple[float, float]]] = {kind: [] for kind in ENGINES}
    for round_ in range(config.warmup + config.rounds):
        for kind in ENGINES:  # interleaved: the box's load hits the three alike
            dist.barrier()
            start = time.perf_counter()
            engines[kind].train_batch(iter(batches))
            if round_ >= config.warmup:
                spans[kind].append((start, time.perf_counter()))
    times = {kind: _step_ms(spans[kind]) for kind in ENGINES}
    overlapped = engines["ours_overlap_on"].pipeline_executor.overlap is not None
    return {"times_ms": times, "overlap_engine": overlapped, "a2a_ms": _a2a_ms(config)}


def _step_ms(spans: list[tuple[float, float]]) -> list[float]:
    """Each step from the first rank's start to the last rank's end (one clock for every process here)."""
    from deepspeed import comm as dist

    starts = torch.tensor([s for s, _ in spans], dtype=torch.float64)
    ends = torch.tensor([e for _, e in spans], dtype=torch.float64)
    dist.all_reduce(starts, op=dist.ReduceOp.MIN)
    dist.all_reduce(ends, op=dist.ReduceOp.MAX)
    return ((ends - starts) * 1e3).tolist()


def _a2a_ms(config: MoEBenchConfig) -> float:
    """Median time of one all-to-all of a block's dispatch buffer on the expert-parallel group."""
    from deepspeed import comm as dist
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(f"ep_size_{config.ep}")
    tokens = config.micro_batch * config.seq
    capacity = int(-(-config.top_k * tokens * config.capacity_factor // config.experts))
    buffer = torch.randn(config.experts, capacity, config.hidden)
    out = torch.empty_like(buffer)
    samples = []
    for _ in range(7):
        dist.barrier(group=group)
        start = time.perf_counter()
        dist.all_to_all_single(out, buffer, group=group)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
