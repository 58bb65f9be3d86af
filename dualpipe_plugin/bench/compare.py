"""``dualpipe-plugin bench compare``: our schedules side by side with torch, DeepSpeed and Megatron-Core.

``dualpipe-plugin bench compare [--quick] [--json]``

Everything runs on the emulated device (real tiny math plus fixed sleeps per layer; real gloo P2P and
all-to-all) with one :class:`~dualpipe_plugin.bench.workload.Workload`: P=4 ranks, 16 micro-batches,
8 layers of Linear(64)+tanh in all, per layer F=10, B=20 (I = B - W), W=10 ms (``--emulate``), so the
ideal step is 16·8·30/4 = 960 ms. Two cost models:

* **compute**: the dense model. Ours: dualpipe, dualpipev, 1f1b, zb1p standalone (``DualPipeline``), and
  dualpipev through DeepSpeed and through Megatron-Core. Peers: torch.distributed.pipelining
  ScheduleDualPipeV, Schedule1F1B, ScheduleZBVZeroBubble; DeepSpeed TrainSchedule and DualPipeVEngine;
  Megatron-Core 1F1B and interleaved (VP=2).
* **moe**: 8 reference MoE blocks whose compute carries the same per-block costs and whose dispatch and
  combine are real gloo all-to-alls over an expert-parallel group orthogonal to the pipeline
  (P=4 × EP=2 = 8 processes), sized (``wire_padding``, calibrated first) to about 40% of a block's
  forward and of its input-gradient part. Ours: dualpipev with the overlap engine (and, in full mode,
  without it). Peers: torch ScheduleDualPipeV (pairs run sequentially), DeepSpeed TrainSchedule and
  DualPipeVEngine (the blocks as LayerSpecs).

How it measures: each entry is one ``run_local`` job (spawned afresh for every entry in every round);
rounds interleave the entries (A B C ... A B C ...) so drift hits all alike. In a job: 2 warm-up steps,
then ``steps`` measured steps, each started after a barrier; a step's time is ``max(end) - min(start)``
over the ranks. Per entry: the median step time (all rounds), the **paired ratio** to DeepSpeed's
TrainSchedule of the same cost model (per round: the entry's median / TrainSchedule's median of that
round; the median over rounds), the ratio to the best peer's median, measured / simulated (our simulator
with the costs the entry actually pays: see ``simulated_as``), and the peak of live activations
(per rank, in micro-batch activations of 1/P of the model). The load average is recorded per job.

Outputs (full mode): ``benchmarks/results/compare.json``, ``compare.md`` (the table), ``compare.png``
(bar chart), ``scale.json`` + ``scale_bubble.png`` (:mod:`dualpipe_plugin.bench.scale`) and the README
table between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``. ``--quick`` (one round, 1 warm-up and
2 measured steps, the recorded all-to-all calibration when there is one; < 5 min) writes
``compare_quick.*`` and leaves the README alone. ``python -m dualpipe_plugin.bench.compare readme
[results.json]`` regenerates the README table from a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator, Sequence

from dualpipe_plugin.bench.spans import step_times_ms

__all__ = [
    "Entry",
    "CompareConfig",
    "entries_for",
    "select",
    "paired_ratios",
    "summarize",
    "markdown_table",
    "readme_table",
    "update_readme",
    "run_compare",
    "run_from_args",
]

COMPUTE, MOE = "compute", "moe"
BASELINE = {COMPUTE: "deepspeed:TrainSchedule", MOE: "deepspeed:TrainSchedule@moe"}
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


# -- the entries -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    key: str
    """Stable id, e.g. ``ours:dualpipev``, ``torch:ScheduleZBVZeroBubble@moe``."""
    label: str
    side: str
    """``ours`` or ``peer``."""
    cost_model: str
    target: str
    """``module:function`` run on every rank: ``fn(rank, world_size, Job) -> RankReport``."""
    options: tuple[tuple[str, Any], ...] = ()
    simulate: tuple[str, str] | None = None
    """(our schedule to simulate, how the entry pays the backward): ``split`` (I and W apart), ``no-split``
    (every backward a full B, W=0: DeepSpeed, torch's I carrying the W sleep), ``torch-order`` (torch's
    own action order, converted, I=B and W=0), ``overlap`` (MoE, F&B pairs perfectly overlapped)."""
    requires: tuple[str, ...] = ()
    """Modules that must be importable, else the entry is reported as not available."""


_W = "dualpipe_plugin.bench.workload"
_T = "dualpipe_plugin.bench.peers_torch:run_torch_rank"
_D = "dualpipe_plugin.bench.peers_deepspeed:run_deepspeed_rank"
_M = "dualpipe_plugin.bench.peers_megatron:run_megatron_rank"


def entries_for(quick: bool) -> list[Entry]:
    """Every entry in run order (full mode adds ours dualpipev without overlap on the MoE model)."""
    ours = [
        Entry(f"ours:{s}", f"ours {s}", "ours", COMPUTE, f"{_W}:run_ours_rank", (("schedule", s),), (s, "split"))
        for s in ("dualpipe", "dualpipev", "1f1b", "zb1p")
    ]
    ours += [
        Entry("ours:dualpipev@deepspeed", "ours dualpipev via DeepSpeed", "ours", COMPUTE, _D,
              (("engine", "ours"), ("schedule", "dualpipev")), ("dualpipev", "split"),
              ("deepspeed", "dualpipe_plugin.deepspeed")),
        Entry("ours:dualpipev@megatron", "ours dualpipev via Megatron-Core", "ours", COMPUTE, _M,
              (("schedule", "ours"), ("ours", "dualpipev")), ("dualpipev", "split"),
              ("megatron.core", "dualpipe_plugin.megatron.schedule_fn")),
    ]
    peers = [
        Entry("torch:ScheduleDualPipeV", "torch ScheduleDualPipeV", "peer", COMPUTE, _T, (("schedule", "dualpipev"),),
              ("dualpipev", "torch-order")),
        Entry("torch:Schedule1F1B", "torch Schedule1F1B", "peer", COMPUTE, _T, (("schedule", "1f1b"),),
              ("1f1b", "no-split")),
        Entry("torch:ScheduleZBVZeroBubble", "torch ScheduleZBVZeroBubble", "peer", COMPUTE, _T,
              (("schedule", "zbv"),), ("dualpipev", "torch-order")),
        Entry(BASELINE[COMPUTE], "DeepSpeed TrainSchedule", "peer", COMPUTE, _D, (("engine", "train_schedule"),),
              ("1f1b", "no-split"), ("deepspeed",)),
        Entry("deepspeed:DualPipeVEngine", "DeepSpeed DualPipeVEngine", "peer", COMPUTE, _D,
              (("engine", "dualpipev_engine"),), ("dualpipev", "no-split"), ("deepspeed",)),
        Entry("megatron:1F1B", "Megatron-Core 1F1B", "peer", COMPUTE, _M, (("schedule", "1f1b"),),
              ("1f1b", "no-split"), ("megatron.core",)),
        Entry("megatron:interleaved", "Megatron-Core interleaved (VP=2)", "peer", COMPUTE, _M,
              (("schedule", "interleaved"),), None, ("megatron.core",)),
    ]
    moe = [
        Entry("ours:dualpipev+overlap@moe", "ours dualpipev + overlap", "ours", MOE, f"{_W}:run_ours_moe_rank",
              (("schedule", "dualpipev"), ("overlap", True)), ("dualpipev", "overlap")),
    ]
    moe.append(Entry("ours:dualpipev+overlap@deepspeed@moe", "ours dualpipev + overlap via DeepSpeed", "ours", MOE,
                     _D, (("engine", "ours"), ("schedule", "dualpipev"), ("overlap", True)), ("dualpipev", "overlap"),
                     ("deepspeed", "dualpipe_plugin.deepspeed")))
    if not quick:
        moe.append(Entry("ours:dualpipev@moe", "ours dualpipev, overlap off", "ours", MOE, f"{_W}:run_ours_moe_rank",
                         (("schedule", "dualpipev"), ("overlap", False)), ("dualpipev", "split")))
    moe += [
        Entry("torch:ScheduleDualPipeV@moe", "torch ScheduleDualPipeV", "peer", MOE, _T, (("schedule", "dualpipev"),),
              ("dualpipev", "torch-order")),
        Entry(BASELINE[MOE], "DeepSpeed TrainSchedule", "peer", MOE, _D, (("engine", "train_schedule"),),
              ("1f1b", "no-split"), ("deepspeed",)),
        Entry("deepspeed:DualPipeVEngine@moe", "DeepSpeed DualPipeVEngine", "peer", MOE, _D,
              (("engine", "dualpipev_engine"),), ("dualpipev", "no-split"), ("deepspeed",)),
    ]
    return ours + peers + moe


def select(entries: Sequence[Entry], only: Sequence[str]) -> list[Entry]:
    """The entries whose key is in ``only`` (all when empty), plus the baseline of each cost model they use
    (every ratio is paired to it)."""
    if not only:
        return list(entries)
    unknown = set(only) - {e.key for e in entries}
    if unknown:
        raise ValueError(f"unknown bench compare entries {sorted(unknown)}; valid: {', '.join(e.key for e in entries)}")
    chosen = set(only)
    models = {e.cost_model for e in entries if e.key in chosen}
    return [e for e in entries if e.key in chosen or (e.cost_model in models and e.key == BASELINE[e.cost_model])]


def availability(entry: Entry) -> str | None:
    """None when the entry can run here, else why not."""
    for module in entry.requires:
        try:
            if module.startswith("dualpipe_plugin."):
                import_module(module)
            elif find_spec(module) is None:
                return f"{module} is not installed"
        except Exception as error:  # noqa: BLE001 - any import failure makes the entry unavailable
            return f"import {module} failed: {type(error).__name__}: {error}"
    return None


# -- configuration -------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    quick: bool = False
    rounds: int = 3
    steps: int = 4
    """Measured steps per job (after ``warmup``)."""
    moe_steps: int = 3
    warmup: int = 2
    ranks: int = 4
    microbatches: int = 16
    forward_ms: float = 10.0
    backward_ms: float = 20.0
    weight_ms: float = 10.0
    results_dir: str = "benchmarks/results"
    readme: str | None = "README.md"
    """Regenerate this README's table (None: leave it)."""
    only: tuple[str, ...] = ()
    """Run only these entries (keys; tests, investigations), plus their cost models' baselines."""


def _workloads(config: CompareConfig, padding: int):
    from dualpipe_plugin.bench.workload import MoEWorkload, Workload

    dense = Workload(ranks=config.ranks, microbatches=config.microbatches, forward_ms=config.forward_ms,
                     backward_ms=config.backward_ms, weight_ms=config.weight_ms, warmup=config.warmup,
                     steps=config.steps)
    moe = MoEWorkload()
    moe = replace(moe, model=replace(moe.model, wire_padding=padding))
    return {COMPUTE: dense, MOE: replace(dense, moe=moe, steps=config.moe_steps)}


# -- the all-to-all calibration ------------------------------------------------------------------------------
def _calibrate_rank(rank: int, world_size: int, workload, paddings: tuple[int, ...]) -> list[float]:
    import torch.distributed as dist

    from dualpipe_plugin.bench.overlap import _transfer_time
    from dualpipe_plugin.bench.workload import moe_setup

    setup = moe_setup(workload)
    moe = workload.moe
    rows, width = moe.batch * moe.seq * moe.model.top_k, moe.model.dim + 1
    _transfer_time(setup.ep, rows, width, paddings[-1], repeats=3)  # warm the connections and buffers
    times = []
    for padding in paddings:
        dist.barrier()  # every EP group transfers at the same time, as in a step
        times.append(_transfer_time(setup.ep, rows, width, padding))  # mean over the group's two ranks
    return times


def calibrate_all_to_all(config: CompareConfig) -> dict:
    """The ``wire_padding`` at which one block's two forward transfers take ``comm_share`` of its forward.

    Measured where the benchmark runs: P × EP processes, every expert-parallel group transferring at the
    same time (on this 2-core box gloo's copies through the loopback compete for the cores, so a transfer
    alone is faster than inside a step). One transfer's time (median of 9 per group, median over the
    groups) on a grid of paddings, a straight line fitted through it, solved for
    ``comm_share / (1 - comm_share) · F / 2`` (two transfers per block and direction).
    """
    from dualpipe_plugin.bench.overlap import _PADDINGS
    from dualpipe_plugin.launch import run_local

    workload = _workloads(config, 0)[MOE]
    moe = workload.moe
    target_ms = moe.comm_share / (1 - moe.comm_share) * config.forward_ms / 2
    per_rank = run_local(_calibrate_rank, workload.processes, (workload, _PADDINGS), timeout_s=240)
    times_ms = [statistics.median(r[i] for r in per_rank) * 1e3 for i in range(len(_PADDINGS))]
    # A least-squares line through the grid: single points are noisy on a shared box, the trend is not.
    slope, intercept = statistics.linear_regression(_PADDINGS, times_ms)
    padding = int(round(min(max((target_ms - intercept) / slope, 0), _PADDINGS[-1]))) if slope > 0 else _PADDINGS[-1]
    return {
        "wire_padding": padding,
        "transfer_ms": round(intercept + slope * padding, 3),
        "target_transfer_ms": round(target_ms, 3),
        "comm_share_target": moe.comm_share,
        "fit_ms": {"intercept": round(intercept, 4), "per_1000_columns": round(slope * 1000, 4)},
        "grid_ms": {str(p): round(t, 3) for p, t in zip(_PADDINGS, times_ms)},
        "processes": workload.processes,
        "source": "measured",
    }


# -- simulation ------------------------------------------------------------------------------------------------
def _torch_order_schedule(order: dict, ranks: int, microbatches: int):
    """torch's V order (``0F3``, ``7I0``, ``(0F7;7B3)OVERLAP_F_B``) as our IR (stage s < P: chunk 0)."""
    import re

    from dualpipe_plugin.schedules import Schedule, build_schedule, parse_ranks

    def op(text: str) -> str:
        match = re.fullmatch(r"(\d+)([FIWB])(\d+)", text)
        stage, kind, mb = int(match.group(1)), match.group(2), int(match.group(3))
        return f"{kind}{0 if stage < ranks else 1}:{mb}"

    lines = []
    for rank in range(ranks):
        tokens = []
        for action in order[rank] if rank in order else order[str(rank)]:
            pair = re.fullmatch(r"\((\w+);(\w+)\)OVERLAP_F_B", action)
            if pair:
                tokens.append(f"{op(pair.group(1))}&{op(pair.group(2))}")
            elif re.fullmatch(r"\d+[FIWB]\d+", action):
                tokens.append(op(action))
        lines.append(f"rank {rank}: " + " ".join(tokens))
    placement = build_schedule("dualpipev", ranks, microbatches).placement
    return Schedule("torch", placement, microbatches, tuple(tuple(row) for row in parse_ranks("\n".join(lines))))


def simulated_ms(entry: Entry, workload, chunk_layers: float, transfer_ms: float, order: dict | None) -> float | None:
    """Our simulator's step for what the entry runs and pays (None: no equivalent schedule)."""
    from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

    if entry.simulate is None:
        return None
    name, how = entry.simulate
    F, B, W = (chunk_layers * c for c in (workload.forward_ms, workload.backward_ms, workload.weight_ms))
    comm = 2 * transfer_ms * chunk_layers if workload.moe else 0.0  # dispatch + combine per block, each way
    if how == "split":
        costs = CostModel(F=F + comm, B=B + comm, W=W)
    elif how == "overlap":  # ideal pair: the transfers of both sides hidden behind their compute
        costs = CostModel(F=F + comm, B=B + comm, W=W, FB=max(F + B, 2 * comm))
    else:  # no-split / torch-order: every backward is a full B; a W op costs nothing
        costs = CostModel(F=F + comm, B=B + comm, W=0.0)
    if how == "torch-order":
        if order is None:
            return None
        schedule = _torch_order_schedule(order, workload.ranks, workload.microbatches)
    else:
        schedule = build_schedule(name, workload.ranks, workload.microbatches)
    return simulate(schedule, costs).makespan


def _chunk_layers(entry: Entry, workload) -> float:
    from dualpipe_plugin.schedules import build_schedule

    if entry.simulate is None:
        return 0.0
    stages = build_schedule(entry.simulate[0], workload.ranks, workload.microbatches).placement.num_stages
    return workload.layers / stages


# -- statistics ------------------------------------------------------------------------------------------------
def paired_ratios(entry_rounds: Sequence[float | None], baseline_rounds: Sequence[float | None]) -> list[float]:
    """Per round where both ran: entry median / baseline median."""
    return [a / b for a, b in zip(entry_rounds, baseline_rounds) if a is not None and b is not None and b > 0]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict]], entries: Sequence[Entry]) -> dict[str, dict]:
    """Per entry: median of all measured steps, per-round medians, paired ratio to the baseline, ratio to the
    best peer. ``runs[key]`` lists one record per round: ``{"steps_ms": [...]}`` or ``{"error": ...}``."""
    summary: dict[str, dict] = {}
    for entry in entries:
        rounds = runs.get(entry.key, [])
        per_round = [_median(r["steps_ms"]) if "steps_ms" in r else None for r in rounds]
        steps = [t for r in rounds for t in r.get("steps_ms", [])]
        summary[entry.key] = {"median_ms": _median(steps), "round_medians_ms": per_round}
    for entry in entries:
        base = summary.get(BASELINE[entry.cost_model], {}).get("round_medians_ms", [])
        ratios = paired_ratios(summary[entry.key]["round_medians_ms"], base)
        summary[entry.key]["paired_ratios"] = ratios
        summary[entry.key]["ratio_to_baseline"] = _median(ratios)
    for model in (COMPUTE, MOE):
        peers = [summary[e.key]["median_ms"] for e in entries
                 if e.cost_model == model and e.side == "peer" and summary[e.key]["median_ms"] is not None]
        best = min(peers) if peers else None
        for entry in entries:
            if entry.cost_model == model:
                value = summary[entry.key]["median_ms"]
                summary[entry.key]["ratio_to_best_peer"] = value / best if value is not None and best else None
    return summary


def _paired_to(by_key: dict, entry_key: str, peer_key: str) -> float | None:
    ratios = paired_ratios(by_key.get(entry_key, {}).get("round_medians_ms", []),
                           by_key.get(peer_key, {}).get("round_medians_ms", []))
    return _median(ratios)


def evaluate_goals(results: dict) -> list[dict]:
    """The issue's goals, each with its measured value and whether it is met (None: not measured)."""
    by_key = {e["key"]: e for e in results["entries"]}

    def ratio(key: str) -> float | None:
        return by_key.get(key, {}).get("ratio_to_baseline")

    goals = []

    def goal(what: str, value: float | None, limit: float) -> None:
        goals.append({"goal": what, "value": None if value is None else round(value, 3), "limit": limit,
                      "met": None if value is None else value <= limit})

    goal("compute: ours dualpipev / DeepSpeed TrainSchedule (paired)", ratio("ours:dualpipev"), 0.86)
    peer_ratios = [e["ratio_to_baseline"] for e in results["entries"]
                   if e["cost_model"] == COMPUTE and e["side"] == "peer" and e["key"] != BASELINE[COMPUTE]
                   and e.get("ratio_to_baseline") is not None]
    ours = ratio("ours:dualpipev")
    goals.append({"goal": "compute: ours dualpipev ahead of every peer", "value": None if ours is None else round(ours, 3),
                  "limit": None if not peer_ratios else round(min(peer_ratios), 3),
                  "met": None if ours is None or not peer_ratios else ours < min(peer_ratios)})
    overlap = "ours:dualpipev+overlap@moe"
    goal("moe: ours dualpipev + overlap / DeepSpeed TrainSchedule (paired)", ratio(overlap), 0.80)
    goal("moe: ours dualpipev + overlap / torch ScheduleDualPipeV (paired)",
         _paired_to(by_key, overlap, "torch:ScheduleDualPipeV@moe"), 0.85)
    goal("moe: ours dualpipev + overlap / DeepSpeed DualPipeVEngine (paired)",
         _paired_to(by_key, overlap, "deepspeed:DualPipeVEngine@moe"), 0.85)
    via_deepspeed = "ours:dualpipev+overlap@deepspeed@moe"
    goal("moe: ours dualpipev + overlap via DeepSpeed / DeepSpeed TrainSchedule (paired)", ratio(via_deepspeed), 0.80)
    goal("moe: ours dualpipev + overlap via DeepSpeed / DeepSpeed DualPipeVEngine (paired)",
         _paired_to(by_key, via_deepspeed, "deepspeed:DualPipeVEngine@moe"), 0.85)
    for entry in results["entries"]:
        if entry["side"] == "ours" and entry["status"] == "ok":
            goal(f"{entry['cost_model']}: {entry['label']} measured / simulated", entry.get("measured_over_simulated"),
                 1.03)
    return goals


# -- running ---------------------------------------------------------------------------------------------------
def _run_job(entry: Entry, workload) -> tuple[dict, Any]:
    from dualpipe_plugin.bench.workload import Job
    from dualpipe_plugin.launch import LocalRunError, run_local

    module, function = entry.target.split(":")
    fn = getattr(import_module(module), function)
    load = os.getloadavg()[0]
    started = time.monotonic()
    budget = 240 + 15 * (workload.warmup + workload.steps) * (3 if workload.moe else 1)
    try:
        reports = run_local(fn, workload.processes, (Job(workload, entry.options),), timeout_s=budget,
                            pg_timeout_s=workload.timeout_s)
    except LocalRunError as error:
        first = error.failures[0] if error.failures else None
        reason = f"rank {first.rank}: {first.error}" if first else str(error).splitlines()[0]
        return {"error": reason, "load_1m": round(load, 2), "wall_s": round(time.monotonic() - started, 1)}, None
    steps_ms = step_times_ms([r.spans for r in reports])
    cpu_s = sum(r.timing.cpu_s for r in reports)
    record = {
        "steps_ms": [round(t, 2) for t in steps_ms],
        # share of the box's cores this job's processes kept busy during the measured steps
        "cpu_utilisation": round(cpu_s / (sum(steps_ms) / 1e3 * (os.cpu_count() or 1)), 3),
        "load_1m": round(load, 2),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return record, reports


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr while the benchmark runs: DeepSpeed and Megatron print to stdout
    (in this process on import and in every spawned rank, which inherits the descriptor), and ``--json``
    promises one JSON object there."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_compare(config: CompareConfig) -> dict:
    with _stdout_to_stderr():
        return _run_compare(config)


def _run_compare(config: CompareConfig) -> dict:
    from dualpipe_plugin.bench.machine import machine_facts

    began = time.monotonic()
    facts = machine_facts()
    entries = select(entries_for(config.quick), config.only)
    available = {e.key: availability(e) for e in entries}
    calibration = _calibration(config, entries)
    workloads = _workloads(config, calibration["wire_padding"] if calibration else 0)
    runs: dict[str, list[dict]] = {e.key: [] for e in entries}
    first_reports: dict[str, Any] = {}
    for round_index in range(config.rounds):
        for entry in entries:
            if available[entry.key] is not None:
                continue
            record, reports = _run_job(entry, workloads[entry.cost_model])
            runs[entry.key].append(record)
            if reports is not None and entry.key not in first_reports:
                first_reports[entry.key] = reports
            shown = record.get("steps_ms") or record.get("error")
            _progress(f"[compare] round {round_index + 1}/{config.rounds} {entry.key}: {shown} "
                      f"(load {record['load_1m']}, {record['wall_s']} s)")
    summary = summarize(runs, entries)
    rows = []
    for entry in entries:
        workload = workloads[entry.cost_model]
        row = {"key": entry.key, "label": entry.label, "side": entry.side, "cost_model": entry.cost_model,
               "processes": workload.processes}
        if available[entry.key] is not None:
            rows.append(row | {"status": "not available", "reason": available[entry.key]})
            continue
        errors = [r["error"] for r in runs[entry.key] if "error" in r]
        stats = summary[entry.key]
        row |= {"status": "ok" if stats["median_ms"] is not None else "failed",
                **{k: _round(v) for k, v in stats.items()}, "runs": runs[entry.key]}
        if errors:
            row["errors"] = errors
        reports = first_reports.get(entry.key)
        order = reports[0].extras.get("pipeline_order") if reports else None
        transfer_ms = calibration["transfer_ms"] if calibration and workload.moe else 0.0
        simulated = simulated_ms(entry, workload, _chunk_layers(entry, workload), transfer_ms, order)
        if simulated is not None:
            row["simulated_ms"] = round(simulated, 1)
            row["simulated_as"] = f"{entry.simulate[0]} ({entry.simulate[1]})"
            if stats["median_ms"] is not None:
                row["measured_over_simulated"] = round(stats["median_ms"] / simulated, 4)
        if reports:
            layers_per_unit = workload.emulated_layers_total() / workload.ranks
            peaks = [r.peak_layers for r in reports]
            row["peak_activations"] = round(max(peaks) / layers_per_unit, 2)
            row["peak_layers_per_rank"] = peaks
            row["extras"] = {k: v for k, v in reports[0].extras.items() if k != "pipeline_order"}
        utilisation = [r["cpu_utilisation"] for r in runs[entry.key] if "cpu_utilisation" in r]
        if utilisation:
            row["cpu_utilisation"] = round(statistics.median(utilisation), 3)
        rows.append(row)
    results = {
        "benchmark": "compare",
        "mode": "quick" if config.quick else "full",
        "config": asdict(config),
        "workload": _describe(workloads),
        "ideal_ms": config.microbatches * workloads[COMPUTE].layers * (config.forward_ms + config.backward_ms)
        / config.ranks,
        "calibration": calibration,
        "machine": facts,
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        "entries": rows,
    }
    results["goals"] = evaluate_goals(results)
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    _write_outputs(results, config)
    return results


def _round(value):
    if isinstance(value, float):
        return round(value, 4 if value < 10 else 1)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _describe(workloads: dict) -> dict:
    out = {}
    for model, workload in workloads.items():
        data = asdict(workload)
        if workload.moe is None:
            data.pop("moe")
        out[model] = data
    return out


def _calibration(config: CompareConfig, entries: Sequence[Entry]) -> dict | None:
    from dualpipe_plugin.bench.machine import machine_facts

    if not any(e.cost_model == MOE for e in entries):
        return None
    if config.quick:
        recorded = Path(config.results_dir) / "compare.json"
        if recorded.exists():
            try:
                previous = json.loads(recorded.read_text()).get("calibration")
            except (OSError, ValueError):
                previous = None
            if previous and "wire_padding" in previous:
                return previous | {"source": f"recorded in {recorded} on {previous.get('date', '?')}"}
    calibration = calibrate_all_to_all(config)
    return calibration | {"date": machine_facts()["date"]}


# -- outputs ---------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(results: dict) -> str:
    """The full per-entry table, one section per cost model."""
    out = []
    titles = {COMPUTE: "Pure compute (P=4, C=16, 8 layers, per layer F=10, B=20, W=10 ms; ideal 960 ms)",
              MOE: "MoE (P=4 × EP=2 = 8 processes; real gloo all-to-all ≈ 40% of F and of I)"}
    for model in (COMPUTE, MOE):
        rows = [e for e in results["entries"] if e["cost_model"] == model]
        if not rows:
            continue
        out += [f"### {titles[model]}", "",
                "| entry | median step ms | × DeepSpeed TrainSchedule (paired) | × best peer | measured / simulated "
                "| simulated ms (as) | peak activations (1/P of the model) | CPU busy |",
                "|---|---|---|---|---|---|---|---|"]
        for e in rows:
            label = f"**{e['label']}**" if e["side"] == "ours" else e["label"]
            if e["status"] != "ok":
                out.append(f"| {label} | {e['status']}: {e.get('reason') or '; '.join(e.get('errors', []))[:120]} "
                           "| | | | | | |")
                continue
            simulated = "–" if e.get("simulated_ms") is None else f"{e['simulated_ms']:.0f} ({e['simulated_as']})"
            out.append(f"| {label} | {e['median_ms']:.0f} | {_fmt(e.get('ratio_to_baseline'), 3)} "
                       f"| {_fmt(e.get('ratio_to_best_peer'), 3)} | {_fmt(e.get('measured_over_simulated'), 3)} "
                       f"| {simulated} | {_fmt(e.get('peak_activations'), 2)} "
                       f"| {_fmt(None if e.get('cpu_utilisation') is None else 100 * e['cpu_utilisation'], 0, '%')} |")
        out.append("")
    goals = results.get("goals", [])
    if goals:
        out += ["### Goals", "", "| goal | value | limit | met |", "|---|---|---|---|"]
        for g in goals:
            met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            out.append(f"| {g['goal']} | {_fmt(g['value'], 3)} | {g['limit']} | {met} |")
        out.append("")
    out.append("Ratios are paired per round (each entry's median over DeepSpeed TrainSchedule's median of the same "
               "round), then the median over rounds. *simulated as*: our simulator on the schedule the entry runs "
               "with the costs it pays (split: I and W apart; no-split: every backward a full B; torch-order: "
               "torch's own action order, its I carrying the W sleep; overlap: MoE pairs perfectly overlapped). "
               "CPU busy: CPU time of the job's processes over the measured steps, as a share of all cores.")
    out.append("")
    machine = results["machine"]
    out.append(f"{results['mode']} run, {results['config']['rounds']} round(s), {machine['date']}, {machine['cpus']} "
               f"cores, load average {machine['load_average_1m_5m_15m'][0]} → {results['load_average_1m_end']}, "
               f"{results['elapsed_s']:.0f} s in all. Command: `dualpipe-plugin bench compare"
               f"{' --quick' if results['mode'] == 'quick' else ''}`.")
    return "\n".join(out) + "\n"


def readme_table(results: dict) -> str:
    """The README's compact table: one row per entry that ran, paired ratio and the goals."""
    lines = ["| cost model | entry | median step ms | × DeepSpeed TrainSchedule | measured / simulated |",
             "|---|---|---|---|---|"]
    for e in results["entries"]:
        label = f"**{e['label']}**" if e["side"] == "ours" else e["label"]
        if e["status"] != "ok":
            lines.append(f"| {e['cost_model']} | {label} | {e['status']} | | |")
            continue
        lines.append(f"| {e['cost_model']} | {label} | {e['median_ms']:.0f} | {_fmt(e.get('ratio_to_baseline'), 3)} "
                     f"| {_fmt(e.get('measured_over_simulated'), 3)} |")
    machine = results["machine"]
    lines += ["", f"Emulated device, P=4, C=16 ({results['mode']} run of `dualpipe-plugin bench compare`, "
              f"{results['config']['rounds']} round(s), {machine['date'][:10]}, load average "
              f"{machine['load_average_1m_5m_15m'][0]}); paired ratios per round, medians. Details, goals and "
              f"peak activations: `benchmarks/results/compare.md`; scaling: `benchmarks/results/scale_bubble.png`."]
    return "\n".join(lines)


def update_readme(results: dict, readme: str | Path) -> bool:
    """Replace the text between the bench markers of ``readme`` with :func:`readme_table`; False if the
    markers are missing."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(README_BEGIN)] + "\n" + readme_table(results) + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return True


def bar_chart(results: dict, path: str | Path) -> None:
    """Paired ratio to DeepSpeed TrainSchedule per entry, one panel per cost model, goals as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in (COMPUTE, MOE) if any(e["cost_model"] == m for e in results["entries"])]
    heights = [sum(1 for e in results["entries"] if e["cost_model"] == m) for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 0.42 * sum(heights) + 1.6 * len(models)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    goals = {COMPUTE: [(0.86, "goal 0.86")], MOE: [(0.80, "goal 0.80")]}
    for ax, model in zip(axes[:, 0], models):
        rows = [e for e in results["entries"] if e["cost_model"] == model]
        labels = [e["label"] + ("" if e["status"] == "ok" else f" ({e['status']})") for e in rows]
        values = [e.get("ratio_to_baseline") or 0.0 for e in rows]
        colors = ["#d95f02" if e["side"] == "ours" else "#7570b3" for e in rows]
        ax.barh(range(len(rows)), values, color=colors)
        for i, v in enumerate(values):
            if v:
                ax.text(v + 0.005, i, f"{v:.3f}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        for x, text in goals[model]:
            ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
            ax.text(x + 0.004, len(rows) - 0.6, text, fontsize=7, ha="left")
        ax.axvline(1.0, color="grey", linewidth=0.6)
        ax.set_xlim(0.5, max([1.1] + [v + 0.08 for v in values]))
        ax.set_title({COMPUTE: "pure compute", MOE: "MoE, EP=2 (8 processes)"}[model], fontsize=10)
        ax.set_xlabel("step time / DeepSpeed TrainSchedule (paired, median over rounds; lower is better)",
                      fontsize=8)
    fig.suptitle("bench compare: emulated device, P=4, C=16 (orange: ours)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_outputs(results: dict, config: CompareConfig) -> None:
    directory = Path(config.results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stem = "compare_quick" if config.quick else "compare"
    (directory / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / f"{stem}.md").write_text(markdown_table(results))
    bar_chart(results, directory / f"{stem}.png")
    results["outputs"] = [str(directory / f"{stem}.{ext}") for ext in ("json", "md", "png")]
    if not config.quick:
        from dualpipe_plugin.bench.scale import run_scale

        scale = run_scale(directory)
        results["outputs"] += scale["outputs"]
        if config.readme and update_readme(results, config.readme):
            results["outputs"].append(config.readme)


# -- entry points ----------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    """The checkout holding this package when there is one (benchmarks/ next to it), else the current dir."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() else Path.cwd()


def run_from_args(args: argparse.Namespace) -> dict:
    """``bench compare``: ``--quick`` (one round, 1 warm-up and 2 measured steps per job, < 5 min),
    ``--steps`` (measured steps per job in full mode, which warms up with 2), ``--ranks``/``--microbatches``,
    ``--emulate`` (per-layer costs); ``--out`` also writes the JSON there."""
    from dualpipe_plugin.schedules import CostModel, build_schedule

    costs = CostModel.parse(args.emulate)
    for name in ("dualpipe", "dualpipev", "1f1b", "zb1p"):
        build_schedule(name, args.ranks, args.microbatches)  # bad input fails before spawning
    root = _repo_root()
    if args.quick:
        config = CompareConfig(quick=True, rounds=1, steps=2, moe_steps=2, warmup=1, readme=None)
    else:
        config = CompareConfig(steps=max(1, args.steps), moe_steps=max(1, min(args.steps, 3)))
    config = replace(config, ranks=args.ranks, microbatches=args.microbatches, forward_ms=costs.F,
                     backward_ms=costs.B, weight_ms=costs.W, results_dir=str(root / "benchmarks" / "results"),
                     readme=None if config.readme is None else str(root / "README.md"))
    return run_compare(config)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dualpipe_plugin.bench.compare readme [results.json]``: regenerate the README table."""
    parser = argparse.ArgumentParser(description="bench compare helpers")
    parser.add_argument("action", choices=["readme"])
    parser.add_argument("results", nargs="?", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    root = _repo_root()
    results = json.loads(Path(args.results or root / "benchmarks" / "results" / "compare.json").read_text())
    readme = args.readme or root / "README.md"
    if not update_readme(results, readme):
        print(f"{readme} has no {README_BEGIN} / {README_END} markers", file=sys.stderr)
        return 1
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
