"""``bench compare``'s all-to-all calibration: the ``wire_padding`` at which the MoE model's transfers take
their share of a block, measured where the benchmark runs (quick mode reuses the recorded one)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from dualpipe_plugin.bench.compare.config import CompareConfig, workloads_for
from dualpipe_plugin.bench.compare.entries import MOE, Entry

__all__ = ["calibrate_all_to_all", "calibration_for"]


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

    workload = workloads_for(config, 0)[MOE]
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


def calibration_for(config: CompareConfig, entries: Sequence[Entry]) -> dict | None:
    """None without MoE entries; in quick mode the calibration recorded in ``compare.json`` when there is
    one; else :func:`calibrate_all_to_all`, dated."""
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
