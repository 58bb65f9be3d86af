"""Running ``bench compare``: every entry one freshly spawned job per round, rounds interleaving the entries
(A B C … A B C …) so drift hits all alike; then one results row per entry (medians, ratios, simulated step,
peak activations) and the outputs written."""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from importlib import import_module
from typing import Any, Iterator

from dualpipe_plugin.bench.compare.calibrate import calibration_for
from dualpipe_plugin.bench.compare.config import CompareConfig, workloads_for
from dualpipe_plugin.bench.compare.entries import COMPUTE, Entry, availability, entries_for, select
from dualpipe_plugin.bench.compare.report import write_outputs
from dualpipe_plugin.bench.compare.simulate import layers_per_chunk, simulated_ms
from dualpipe_plugin.bench.compare.summary import evaluate_goals, summarize
from dualpipe_plugin.bench.spans import step_times_ms

__all__ = ["run_compare"]


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
    calibration = calibration_for(config, entries)
    workloads = workloads_for(config, calibration["wire_padding"] if calibration else 0)
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
        simulated = simulated_ms(entry, workload, layers_per_chunk(entry, workload), transfer_ms, order)
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
    write_outputs(results, config)
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
