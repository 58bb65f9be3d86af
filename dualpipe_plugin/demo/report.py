"""The demo's report: per-rank measured vs simulated bubble, peak activations, and the files it writes.

The simulated figures come from the *measured* op durations of the recorded step (median F, B, I, W and
F&B over all ranks), so the comparison shows what the runtime and the machine add to the schedule's own
bubble.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from dualpipe_plugin.schedules import CostModel, Pair, Schedule, simulate
from dualpipe_plugin.schedules.render import write_chrome_trace, write_timeline_png

__all__ = ["BubbleRow", "bubble_table", "measured_costs", "write_loss_curve", "write_run_files"]


@dataclass(frozen=True)
class BubbleRow:
    rank: int
    measured_ms: float
    simulated_ms: float
    peak_activations: int
    simulated_peak: int


def measured_costs(timelines: list[list[tuple]]) -> CostModel:
    """Median measured duration per op kind (ms), as a cost model."""
    durations: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": [], "FB": []}
    for row in timelines:
        for action, start, end in row:
            key = "FB" if isinstance(action, Pair) else action.kind.value
            durations[key].append(end - start)

    def median(key: str, default: float) -> float:
        return statistics.median(durations[key]) if durations[key] else default

    forward = median("F", 0.0)
    weight = median("W", 0.0)
    full = median("B", median("I", 0.0) + weight)
    return CostModel(F=forward, B=max(full, weight), W=weight, I=median("I", max(full - weight, 0.0)),
                     FB=median("FB", forward + full))


def bubble_table(schedule: Schedule, timelines: list[list[tuple]], peaks: list[int]) -> list[BubbleRow]:
    predicted = simulate(schedule, measured_costs(timelines))
    span = max(row[-1][2] for row in timelines) - min(row[0][1] for row in timelines)
    rows = []
    for rank, row in enumerate(timelines):
        busy = sum(end - start for _, start, end in row)
        rows.append(BubbleRow(rank, span - busy, predicted.idle_per_rank[rank], peaks[rank],
                              predicted.peak_activations_per_rank[rank]))
    return rows


def format_table(rows: list[BubbleRow]) -> str:
    lines = ["  rank  bubble measured  bubble simulated  peak activations (simulated)"]
    for row in rows:
        lines.append(f"  {row.rank:<4}  {row.measured_ms:12.1f} ms  {row.simulated_ms:13.1f} ms  "
                     f"{row.peak_activations:>8} ({row.simulated_peak})")
    return "\n".join(lines)


def write_loss_curve(losses: list[float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_run_files(directory: Path, schedule: Schedule, timelines: list[list[tuple]], losses: list[float]) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    title = f"{schedule.name} P={schedule.num_ranks} C={schedule.num_microbatches} (measured)"
    return {
        "timeline": write_timeline_png(timelines, directory / "timeline.png", title),
        "trace": write_chrome_trace(timelines, directory / "trace.json", title),
        "loss_curve": write_loss_curve(losses, directory / "loss.png", f"{schedule.name}: training loss"),
    }
