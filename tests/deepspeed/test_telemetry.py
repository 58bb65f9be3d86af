"""DeepSpeed's timers and monitor under our schedules (dualpipe_plugin/deepspeed/telemetry.py).

A real 2-process DeepSpeed run on the emulated device with ``"wall_clock_breakdown": true`` and
DeepSpeed's CSV monitor: the timer lines DeepSpeed prints and the CSV files it writes are read back and
checked against the schedule each rank ran and the emulated costs (a sleep never ends early, so every
timer has a floor: the work the schedule put on rank 0). One spawn runs three engines: plain layers,
staged layers with ``"overlap": true`` (pairs in their own timer), and the monitor without the breakdown.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .telemetry_harness import TelemetryCase, run_telemetry_rank  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def _timers(lines: list[str]) -> list[dict[str, float]]:
    """Each ``time (ms) | name: value | ...`` line DeepSpeed printed, as a dict."""
    found = []
    for line in lines:
        if "time (ms)" in line:
            found.append({name: float(value) for name, value in re.findall(r"\| (\w+): ([0-9.]+)", line)})
    return found


def _step_timers(lines: list[str], name: str) -> list[dict[str, float]]:
    return [t for t in _timers(lines) if name in t]


def _csv(directory: Path, metric: str) -> list[tuple[int, float]]:
    with open(directory / f"Train_Samples_{metric}.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", metric]
    return [(int(step), float(value)) for step, value in rows[1:]]


def _work_floor_ms(actions: list[str], part_ms: float) -> dict[str, float]:
    """The emulated work the schedule puts on a rank (one layer per chunk: F, I, W = part_ms each)."""
    forward = backward = weight = pairs = 0.0
    for action in actions:
        if "&" in action:
            pairs += 1
        elif action.startswith("F"):
            forward += part_ms
        elif action.startswith("B"):
            backward += 2 * part_ms
        elif action.startswith("I"):
            backward += part_ms
        elif action.startswith("W"):
            backward += part_ms
            weight += part_ms
    return {"forward": forward, "backward": backward, "weight": weight, "pairs": pairs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("monitor")
    cases = [
        TelemetryCase(monitor_dir=str(directory)),
        TelemetryCase(monitor_dir=str(directory), staged=True),
        TelemetryCase(monitor_dir=str(directory), wall_clock_breakdown=False, steps=1),
    ]
    per_rank = run_local(run_telemetry_rank, 2, args=(cases,), timeout_s=300)
    return {"cases": cases, "per_rank": per_rank, "directory": directory}


def test_deepspeed_timers_hold_the_steps_work(runs) -> None:
    """fwd/bwd/bwd_inner/bwd_allreduce/step and the new W and overlap timers, printed by DeepSpeed's own
    timer log every step, at least the emulated work of rank 0's schedule; bwd = bwd_inner + allreduce."""
    for index, staged in ((0, False), (1, True)):
        case = runs["cases"][index]
        rank0 = runs["per_rank"][0][index]
        assert rank0["overlap"] is staged
        floor = _work_floor_ms(rank0["actions"], case.part_ms)
        micro = _step_timers(rank0["log"], "fwd_microstep")
        new = _step_timers(rank0["log"], "bwd_weight_microstep")
        recv = _step_timers(rank0["log"], "pipe_recv_input")
        assert len(micro) == len(new) == len(recv) == case.steps
        if not staged:  # sequential pairs: their F in fwd, their B (I + W) in bwd_inner
            floor = dict(floor, forward=floor["forward"] + floor["pairs"] * case.part_ms,
                         backward=floor["backward"] + floor["pairs"] * 2 * case.part_ms)
        for timers, extra, waits in zip(micro, new, recv):
            if staged:  # F&B pairs run interleaved: one figure, at least F + B of every pair
                assert extra["fwd_bwd_overlap_microstep"] >= floor["pairs"] * 3 * case.part_ms
            else:
                assert extra["fwd_bwd_overlap_microstep"] == 0.0
            assert timers["fwd_microstep"] >= floor["forward"] > 0
            assert timers["bwd_inner_microstep"] >= floor["backward"] > 0
            assert timers["bwd_inner_microstep"] >= extra["bwd_weight_microstep"] >= floor["weight"] > 0
            assert timers["bwd_allreduce_microstep"] > 0 and timers["step_microstep"] > 0
            assert timers["bwd_microstep"] == pytest.approx(
                timers["bwd_inner_microstep"] + timers["bwd_allreduce_microstep"], abs=0.011)
            assert waits["pipe_recv_input"] + waits["pipe_recv_grad"] > 0
        bubbles = [float(line.split(":")[1].split()[0]) for line in rank0["log"] if "pipeline bubble fraction" in line]
        assert len(bubbles) == case.steps and all(0.0 < b < 1.0 for b in bubbles)
    assert not any("time (ms)" in line for r in runs["per_rank"] for line in r[2]["log"]), \
        "without wall_clock_breakdown nothing is timed"


def test_csv_monitor_gets_pipeline_engine_events(runs) -> None:
    """DeepSpeed's CSV monitor files (written by global rank 0): train_loss and lr as DeepSpeed writes
    them, samples/s every step, and under wall_clock_breakdown the per-step elapsed times (equal to the
    timer log) and the pipeline's bubble fraction."""
    directory = runs["directory"]
    base = ["train_loss", "lr", "samples_per_sec"]
    timed = ["elapsed_time_ms_forward", "elapsed_time_ms_backward", "elapsed_time_ms_backward_inner",
             "elapsed_time_ms_backward_allreduce", "elapsed_time_ms_step", "elapsed_time_ms_backward_weight",
             "elapsed_time_ms_fwd_bwd_overlap", "elapsed_time_ms_pipe_recv_input",
             "elapsed_time_ms_pipe_recv_grad", "elapsed_time_ms_batch_input", "pipeline_bubble_fraction"]
    for index, case in enumerate(runs["cases"]):
        job = directory / f"job{index}"
        rank0 = runs["per_rank"][0][index]
        expected = base + (timed if case.wall_clock_breakdown else [])
        assert sorted(p.name for p in job.iterdir()) == sorted(f"Train_Samples_{m}.csv" for m in expected)
        samples = [2 * case.micro_batches * (step + 1) for step in range(case.steps)]
        assert _csv(job, "train_loss") == list(zip(samples, rank0["losses"]))
        assert _csv(job, "lr") == [(s, 0.01) for s in samples]
        assert all(s == samples[i] and 0 < value < 1e6 for i, (s, value) in enumerate(_csv(job, "samples_per_sec")))
        if not case.wall_clock_breakdown:
            continue
        micro = _step_timers(rank0["log"], "fwd_microstep")
        for metric, timer in (("forward", "fwd_microstep"), ("backward", "bwd_microstep"),
                              ("backward_inner", "bwd_inner_microstep"),
                              ("backward_allreduce", "bwd_allreduce_microstep")):
            logged = [t[timer] for t in micro]
            # The log prints two decimals; its first line also holds the empty start/stop PipelineEngine
            # makes at initialisation (microseconds).
            assert [v for _, v in _csv(job, f"elapsed_time_ms_{metric}")] == pytest.approx(logged, abs=0.05)
        bubbles = [v for _, v in _csv(job, "pipeline_bubble_fraction")]
        assert all(0.0 < b < 1.0 for b in bubbles)
        assert all(v > 0 for _, v in _csv(job, "elapsed_time_ms_step"))
        overlap = [v for _, v in _csv(job, "elapsed_time_ms_fwd_bwd_overlap")]
        assert all(v > 0 for v in overlap) if case.staged else overlap == [0.0] * case.steps
