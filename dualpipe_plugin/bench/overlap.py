"""``dualpipe-plugin bench overlap``: an MoE F&B pair with and without overlap, then the whole-step gain.

``dualpipe-plugin bench overlap --json`` (``--quick``: fewer repetitions, no whole-step run)

Emulated device, real transfers. Each chunk holds ``blocks_per_chunk`` reference MoE blocks whose two
compute sub-stages (attn, experts) each add an emulated layer (``--emulate`` gives per-chunk F, B, W in
ms, spread over the chunk's compute sub-stages; B = I + W); dispatch and combine are REAL gloo
``all_to_all_single`` transfers between two expert-parallel processes.

1. Pair. Two processes (one EP group of 2), each holding chunks a and b; per repetition b runs a forward
   (untimed), then the pair "F of a & B of b" runs sequentially (``run_pair_sides(overlap=False)``: F
   then B, every transfer waited at once) or overlapped (the engine's rule); both modes alternate.
   The all-to-all is sized first (``wire_padding``: zero columns sent with each token) so that it is
   ``comm_share`` (40%) of the sequential pair. From the sequential pair's trace: ``compute_ms`` (compute
   and weight parts) and ``comm_ms`` (launch to wait of every transfer); ``ideal_ratio`` =
   max(compute, comm) / sequential, the best any overlap can do. ``ratio`` = overlapped / sequential
   (medians over the repetitions; a pair's time is the slower of the two processes).
2. Step. dualpipev with P=``--ranks``, C=``--microbatches`` over P × 2 processes (two data-parallel
   replicas whose stage-s ranks form the EP groups), MoE chunks as above with the calibrated padding,
   overlap on vs off (two pipelines in the same processes, alternating step by step): the median step
   time (max end - min start over all ranks) of ``--steps`` steps each.
   The simulator's prediction with the measured pair costs (F, B, W, FB) is reported next to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.bench.spans import step_times_ms
from dualpipe_plugin.launch import run_local
from dualpipe_plugin.moe import ExpertParallel, MoEConfig, lm_loss, moe_chunks, moe_layers, new_expert_parallel
from dualpipe_plugin.moe.block import MoEBlock
from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer
from dualpipe_plugin.runtime.overlap import Side, StageEvent, run_pair_sides
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.runtime.staged import ComputeStage, StagedChunk, claim_backward
from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups
from dualpipe_plugin.runtime.weight_grad import WeightGradStore, bind_weight_split
from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

__all__ = ["EmulatedMoEBlock", "OverlapBenchConfig", "run_overlap_bench", "run_from_args"]


@dataclass(frozen=True)
class OverlapBenchConfig:
    forward_ms: float = 10.0
    """Emulated forward compute of one chunk (spread over its compute sub-stages)."""
    backward_ms: float = 20.0
    """Emulated full backward of one chunk (input part = backward - weight)."""
    weight_ms: float = 10.0
    blocks_per_chunk: int = 2
    comm_share: float = 0.4
    """Target share of the all-to-all in the sequential pair."""
    batch: int = 4
    seq: int = 32
    repeats: int = 20
    warmup: int = 3
    step: bool = True
    """Also measure the whole step (P × 2 processes)."""
    step_ranks: int = 4
    step_microbatches: int = 16
    step_steps: int = 3
    model: MoEConfig = MoEConfig(dim=32, heads=4, num_experts=8, top_k=2, ffn_dim=64, vocab_size=64)


class EmulatedMoEBlock(nn.Module):
    """An MoE block whose attn and experts sub-stages are each followed by an emulated layer."""

    def __init__(self, block: MoEBlock, costs: EmulatedCosts):
        super().__init__()
        self.block = block
        self.after_attn = EmulatedLayer(block.config.dim, costs)
        self.after_experts = EmulatedLayer(block.config.dim, costs)

    def sub_stages(self):
        attn, dispatch, experts, combine = self.block.sub_stages()
        return (attn, ComputeStage("attn-emulated", _OnResidual(self.after_attn)), dispatch,
                experts, ComputeStage("experts-emulated", _OnResidual(self.after_experts)), combine)


class _OnResidual:
    """Applies a layer to the first tensor of a sub-stage tuple (the residual) and passes the rest on."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, first, *rest):
        return (self.layer(first), *rest)


def _costs(config: OverlapBenchConfig) -> EmulatedCosts:
    substages = 2 * config.blocks_per_chunk
    return EmulatedCosts.per_layer(config.forward_ms, config.backward_ms, config.weight_ms, substages)


def _wrap(config: OverlapBenchConfig):
    costs = _costs(config)
    return lambda block: EmulatedMoEBlock(block, costs)


# -- 1. the pair ---------------------------------------------------------------------------------------
def _pair_chunks(config: OverlapBenchConfig, model: MoEConfig, ep: ExpertParallel) -> tuple[StagedChunk, StagedChunk]:
    chunks = []
    for seed in (1, 2):
        blocks = moe_layers(model, config.blocks_per_chunk, ep=ep, seed=seed).blocks
        chunks.append(StagedChunk([_wrap(config)(block) for block in blocks]))
    return chunks[0], chunks[1]


def _time_pair(chunks, store, overlap: bool, config: OverlapBenchConfig, group, trace=None) -> float:
    a, b = chunks
    shape = (config.batch, config.seq, config.model.dim)
    x_a, x_b = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    out_b = b(x_b)
    grad_b = torch.randn(shape)
    dist.barrier(group=group)
    start = time.perf_counter()
    forward = Side("F", a, lambda: (a.begin((x_a,)), (x_a,)), lambda run, outputs: None, trace=trace)
    backward = Side(
        "B", b, lambda: claim_backward(b, [out_b], [grad_b]), lambda run, grads: run.deposit_input_grads(grads),
        backward=True, store=store, trace=trace,
    )
    run_pair_sides(forward, backward, overlap=overlap)
    elapsed = time.perf_counter() - start
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    return elapsed


def _reduce(values: list[float], group, op=dist.ReduceOp.MAX) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op, group=group)
    return (tensor / dist.get_world_size(group) if op == dist.ReduceOp.SUM else tensor).tolist()


def _split_trace(trace: list[StageEvent]) -> dict[str, float]:
    """Seconds of compute, weight parts and transfers; the forward and backward sides' own times."""
    sums = {"compute": 0.0, "comm": 0.0, "weight": 0.0}
    sides: dict[str, list[float]] = {}
    for event in trace:
        sums[event.what] += event.end - event.start
        span = sides.setdefault(event.side, [event.start, event.end])
        span[0], span[1] = min(span[0], event.start), max(span[1], event.end)
    return {**sums, "F": sides["F"][1] - sides["F"][0], "B": sides["B"][1] - sides["B"][0]}


def _sequential_profile(config, model, group, store_of, repeats: int) -> dict[str, float]:
    """Median compute / comm / side times of the sequential pair (mean over the processes)."""
    chunks, store = store_of(model)
    profiles = []
    for _ in range(repeats):
        trace: list[StageEvent] = []
        total = _time_pair(chunks, store, False, config, group, trace)
        profiles.append({**_split_trace(trace), "total": total})
    keys = sorted(profiles[0])
    medians = [statistics.median(p[k] for p in profiles) for k in keys]
    return dict(zip(keys, _reduce(medians, group, dist.ReduceOp.SUM)))


_PADDINGS = (0, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288)


def _transfer_time(ep: ExpertParallel, rows: int, width: int, padding: int, repeats: int = 9) -> float:
    """Median seconds of one all-to-all of ``rows`` rows (half to the peer) plus its ballast (both ranks)."""
    data = torch.randn(rows, width)
    times = []
    for _ in range(repeats):
        dist.barrier(group=ep.group)
        start = time.perf_counter()
        ep.start(data, [rows // 2, rows - rows // 2], [rows // 2, rows - rows // 2], lambda r: (r,),
                 ballast=padding).wait()
        times.append(time.perf_counter() - start)
    return _reduce([statistics.median(times)], ep.group, dist.ReduceOp.SUM)[0]


def _interpolate(xs, ys, x: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _crossing(paddings, shares: list[float], target: float) -> int:
    """The padding where ``shares`` (measured at ``paddings``) first reaches ``target`` (clamped to the grid)."""
    if shares[0] >= target:
        return paddings[0]
    for (p0, s0), (p1, s1) in zip(zip(paddings, shares), zip(paddings[1:], shares[1:])):
        if s1 >= target:
            return int(round(p0 + (p1 - p0) * (target - s0) / max(s1 - s0, 1e-9)))
    return paddings[-1]


def _pair_main(rank: int, world_size: int, config: OverlapBenchConfig) -> dict:
    torch.manual_seed(rank)
    ep = new_expert_parallel([[0, 1]])
    group = ep.group

    def store_of(model: MoEConfig):
        chunks = _pair_chunks(config, model, ep)
        store = WeightGradStore()
        bind_weight_split(chunks, store)
        return chunks, store

    # Size the all-to-all: compute from the sequential pair (sleep-dominated, stable); one transfer's
    # time alone on a grid of paddings (a lockstep median: robust to a loaded machine, unlike the pair's
    # comm, which also counts waiting for a late peer); the padding where the pair's transfers would take
    # the target share, interpolated; then once more with the transfers' slow-down inside the pair. The
    # final share is measured and reported as it comes out.
    base = _sequential_profile(config, config.model, group, store_of, 3)
    compute = base["compute"] + base["weight"]
    transfers = 4 * config.blocks_per_chunk
    rows = config.batch * config.seq * config.model.top_k
    per_transfer = [_transfer_time(ep, rows, config.model.dim + 1, padding) for padding in _PADDINGS]
    shares = [transfers * t / (transfers * t + compute) for t in per_transfer]
    padding = int(_reduce([_crossing(_PADDINGS, shares, config.comm_share)], group)[0])  # one value for both
    # One correction: transfers run slower inside the pair than alone (they share the cores with compute),
    # and the pair also spends time between sub-stages.
    trial = _sequential_profile(config, replace(config.model, wire_padding=padding), group, store_of, 5)
    predicted = transfers * _interpolate(_PADDINGS, per_transfer, padding)
    inflation = max(1.0, trial["comm"] / max(predicted, 1e-9))
    other = max(0.0, trial["total"] - trial["compute"] - trial["weight"] - trial["comm"])  # Python between stages
    shares = [inflation * transfers * t / (inflation * transfers * t + compute + other) for t in per_transfer]
    padding = int(_reduce([_crossing(_PADDINGS, shares, config.comm_share)], group)[0])
    model = replace(config.model, wire_padding=padding)
    chunks, store = store_of(model)
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(config.warmup + config.repeats):
        for overlap in ((False, True) if repeat % 2 == 0 else (True, False)):
            elapsed = _time_pair(chunks, store, overlap, config, group)
            if repeat >= config.warmup:
                times[overlap].append(elapsed)
    sequential = _reduce(times[False], group)
    overlapped = _reduce(times[True], group)
    profile = _sequential_profile(config, model, group, store_of, 5)
    return {"padding": padding, "sequential": sequential, "overlapped": overlapped, "profile": profile,
            "calibration": dict(zip(_PADDINGS, shares))}


# -- 2. the whole step ---------------------------------------------------------------------------------
def _step_main(rank: int, world_size: int, config: OverlapBenchConfig, model: MoEConfig) -> dict:
    ranks, replicas = config.step_ranks, world_size // config.step_ranks
    pipelines = [[e * ranks + p for p in range(ranks)] for e in range(replicas)]
    pipe_groups = new_pipeline_groups(pipelines)
    ep = new_expert_parallel([[e * ranks + p for e in range(replicas)] for p in range(ranks)])
    replica, stage_rank = rank // ranks, rank % ranks
    transport = TorchTransport(pipelines[replica], groups=pipe_groups[replica])
    torch.manual_seed(replica)
    n = config.step_microbatches * config.batch
    tokens = torch.randint(0, model.vocab_size, (n, config.seq))
    labels = torch.randint(0, model.vocab_size, (n, config.seq))
    pipes = {}
    for overlap in (False, True):  # two copies of the model, one pipeline each, over the same groups
        layers = moe_layers(model, config.blocks_per_chunk * 2 * ranks, ep=ep, seed=0)
        chunks = moe_chunks(layers, "dualpipev", ranks, stage_rank, wrap=_wrap(config))
        pipes[overlap] = DualPipeline(chunks, "dualpipev", loss_fn=lm_loss, transport=transport, overlap=overlap)
    spans: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for step in range(1 + config.step_steps):  # step 0 warms up; the modes alternate which goes first
        for overlap in ((False, True) if step % 2 == 0 else (True, False)):
            pipe = pipes[overlap]
            for chunk in pipe.chunks:
                chunk.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            pipe.step(tokens if pipe.needs_inputs() else None, labels if pipe.needs_labels() else None,
                      num_microbatches=config.step_microbatches, reduce_loss=False)
            end = time.perf_counter()
            if step >= 1:
                spans[overlap].append((start, end))
    for pipe in pipes.values():
        pipe.close()
    return spans


# -- entry points --------------------------------------------------------------------------------------
def _host() -> dict:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_overlap_bench(config: OverlapBenchConfig) -> dict:
    host = _host()
    pair = run_local(_pair_main, 2, (config,), timeout_s=300)[0]
    sequential = statistics.median(pair["sequential"]) * 1e3
    overlapped = statistics.median(pair["overlapped"]) * 1e3
    profile = {k: v * 1e3 for k, v in pair["profile"].items()}
    compute = profile["compute"] + profile["weight"]
    comm = profile["comm"]
    result = {
        "benchmark": "overlap",
        "sequential_ms": round(sequential, 2),
        "overlapped_ms": round(overlapped, 2),
        "ratio": round(overlapped / sequential, 4),
        "ideal_ratio": round(max(compute, comm) / sequential, 4),
        "compute_ms": round(compute, 2),
        "comm_ms": round(comm, 2),
        "comm_share": round(comm / sequential, 4),
        "wire_padding": pair["padding"],
        "calibration_predicted_comm_share": {str(k): round(v, 4) for k, v in pair["calibration"].items()},
        "sequential_samples_ms": [round(t * 1e3, 2) for t in pair["sequential"]],
        "overlapped_samples_ms": [round(t * 1e3, 2) for t in pair["overlapped"]],
        "config": {k: v for k, v in asdict(config).items() if k != "model"} | {"model": asdict(config.model)},
    }
    if config.step:
        model = replace(config.model, wire_padding=pair["padding"])
        world = 2 * config.step_ranks
        per_rank = run_local(_step_main, world, (config, model), timeout_s=600)
        off_ms = step_times_ms([r[False] for r in per_rank])
        on_ms = step_times_ms([r[True] for r in per_rank])
        off, on = statistics.median(off_ms), statistics.median(on_ms)
        schedule = build_schedule("dualpipev", config.step_ranks, config.step_microbatches)
        costs = dict(F=profile["F"], B=profile["B"], W=profile["weight"])
        predicted_off = simulate(schedule, CostModel(**costs, FB=profile["F"] + profile["B"])).makespan
        predicted_on = simulate(schedule, CostModel(**costs, FB=overlapped)).makespan
        result["step"] = {
            "schedule": "dualpipev", "ranks": config.step_ranks, "microbatches": config.step_microbatches,
            "ep": 2, "processes": world,
            "overlap_off_ms": round(off, 2), "overlap_on_ms": round(on, 2),
            "gain": round(1 - on / off, 4),
            "off_samples_ms": [round(t, 2) for t in off_ms],
            "on_samples_ms": [round(t, 2) for t in on_ms],
            "simulated_off_ms": round(predicted_off, 2), "simulated_on_ms": round(predicted_on, 2),
            "simulated_gain": round(1 - predicted_on / predicted_off, 4),
        }
    result["host"] = host | {"load_average_1m_after": round(os.getloadavg()[0], 2)}
    return result


def run_from_args(args: argparse.Namespace) -> dict:
    """``bench overlap``: ``--emulate`` per-chunk costs, ``--ranks``/``--microbatches``/``--steps`` for the
    whole step, ``--quick`` for fewer repetitions and no whole-step run."""
    costs = CostModel.parse(args.emulate)
    config = OverlapBenchConfig(
        forward_ms=costs.F, backward_ms=costs.B, weight_ms=costs.W,
        repeats=8 if args.quick else 20, step=not args.quick,
        step_ranks=args.ranks, step_microbatches=args.microbatches, step_steps=max(1, args.steps),
    )
    build_schedule("dualpipev", config.step_ranks, config.step_microbatches)  # bad input fails before spawning
    return run_overlap_bench(config)
