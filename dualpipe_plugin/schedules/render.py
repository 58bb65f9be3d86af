"""Renderers for timed schedules: a Chrome trace (chrome://tracing, Perfetto) and a PNG timeline.

Both take per-rank spans, simulated (:class:`SimResult`) or measured by the runtime's recorder, so the
predicted and the real timeline of a run can be drawn the same way. Times are in milliseconds.
matplotlib is imported only when a PNG is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from dualpipe_plugin.schedules.ir import Action, Op, OpKind, Pair

__all__ = [
    "TimedAction", "chrome_trace", "write_chrome_trace", "write_timeline_png", "write_side_by_side_png", "write_timeline",
]

TimedAction = tuple[Action, float, float]
"""(action, start_ms, end_ms) on one rank."""

# Colours in the spirit of DeepSeek's figures: forwards warm, backwards cool, weight passes green.
_COLOURS = {
    (OpKind.F, 0): "#f6c65b",
    (OpKind.F, 1): "#e58b3a",
    (OpKind.B, 0): "#7fb2e5",
    (OpKind.B, 1): "#3f74c2",
    (OpKind.I, 0): "#a9c9ec",
    (OpKind.I, 1): "#6d96d1",
    (OpKind.W, 0): "#9fd49a",
    (OpKind.W, 1): "#55a64e",
}


_DPI = 140  # the PNG's resolution: 18-inch-wide figures come out 2520 pixels wide


def _colour(op: Op) -> str:
    return _COLOURS[(op.kind, min(op.chunk, 1))]


def chrome_trace(rows: Sequence[Iterable[TimedAction]], process_name: str = "pipeline") -> dict:
    """A Chrome trace-event document: one thread per rank, one complete event per action."""
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": process_name}}]
    for rank, row in enumerate(rows):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        for action, start, end in row:
            kind = "F&B" if isinstance(action, Pair) else action.kind.value
            events.append(
                {
                    "name": str(action),
                    "cat": kind,
                    "ph": "X",
                    "pid": 0,
                    "tid": rank,
                    "ts": start * 1000.0,
                    "dur": max(end - start, 0.0) * 1000.0,
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(rows: Sequence[Iterable[TimedAction]], path: str | Path, process_name: str = "pipeline") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(rows, process_name)))
    return path


def _bars(rows: Sequence[Sequence[TimedAction]]) -> tuple[list, list[str]]:
    """The rectangles of the timeline (lane per rank, rank 0 on top) and their colours, in drawing order.

    An F&B pair is its forward (top half) over its backward. Vertices as ``Axes.broken_barh`` makes them.
    """
    vertices, colours = [], []
    for rank, row in enumerate(rows):
        y = len(rows) - 1 - rank
        for action, start, stop in row:
            parts = [(action.forward, 0.5, 0.4), (action.backward, 0.1, 0.4)] if isinstance(action, Pair) else [(action, 0.1, 0.8)]
            x1 = start + (stop - start)
            for op, offset, height in parts:
                y0 = y + offset
                vertices.append([(start, y0), (start, y0 + height), (x1, y0 + height), (x1, y0)])
                colours.append(_colour(op))
    return vertices, colours


def _draw_lanes(ax, rows: Sequence[Sequence[TimedAction]], end: float) -> None:
    """One lane per rank on ``ax``: every bar one PolyCollection, micro-batch labels on the wide ones."""
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgba

    vertices, colours = _bars(rows)
    if vertices:
        # Arrays, not lists: (N, 4, 2) vertices as broken_barh passes them and (N, 4) RGBA colours take
        # PolyCollection's fast paths (lists cost seconds at P=64, C=512).
        rgba = {colour: to_rgba(colour) for colour in set(colours)}
        faces = np.array([rgba[colour] for colour in colours])
        ax.add_collection(PolyCollection(np.array(vertices), facecolors=faces, edgecolor="black", linewidth=0.3))
        ax.autoscale_view()
    for rank, row in enumerate(rows):
        y = len(rows) - 1 - rank
        for action, start, stop in row:
            if stop - start > end / 120:
                label = f"{action.forward.microbatch}|{action.backward.microbatch}" if isinstance(action, Pair) else str(action.microbatch)
                ax.text((start + stop) / 2, y + 0.5, label, ha="center", va="center", fontsize=6)
    ax.set_yticks([len(rows) - 1 - r + 0.5 for r in range(len(rows))], [f"rank {r}" for r in range(len(rows))])
    ax.set_xlim(0, end)


def _legend(ax) -> None:
    from matplotlib.patches import Patch

    legend = [Patch(facecolor=_COLOURS[(k, c)], label=f"{k.value} chunk {c}") for k in OpKind for c in (0, 1)]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=8, fontsize=7, frameon=False)


def write_timeline_png(rows: Sequence[Sequence[TimedAction]], path: str | Path, title: str = "") -> Path:
    """Draw one lane per rank; an F&B pair is drawn as its forward (top half) over its backward.

    All bars are one PolyCollection (one artist however many ops: P=64, C=512 draws in seconds, where an
    artist per op took minutes); micro-batch labels go only on bars wide enough to hold them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    end = max((row[-1][2] for row in rows if row), default=1.0)
    fig, ax = plt.subplots(figsize=(min(4 + end / max(end, 1) * 14, 18), 0.6 * len(rows) + 1.4))
    _draw_lanes(ax, rows, end)
    ax.set_xlabel("time (ms)")
    if title:
        ax.set_title(title)
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def write_side_by_side_png(
    panels: Sequence[tuple[str, Sequence[Sequence[TimedAction]]]], path: str | Path, title: str = ""
) -> Path:
    """Timelines stacked on one time axis, one panel per (label, rows): e.g. the simulated timeline of a
    step over the measured one (the executor's ``record``), so where they part is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    end = max((row[-1][2] for _, rows in panels for row in rows if row), default=1.0)
    height = sum(0.5 * len(rows) + 0.6 for _, rows in panels) + 1.2
    fig, axes = plt.subplots(len(panels), 1, figsize=(16, height), sharex=True, squeeze=False)
    for ax, (label, rows) in zip(axes[:, 0], panels):
        _draw_lanes(ax, rows, end)
        ax.set_ylabel(label, fontsize=8)
        ax.axvline(max((row[-1][2] for row in rows if row), default=0.0), color="red", linewidth=0.8)
        ax.set_xlim(0, end * 1.01)
    axes[-1, 0].set_xlabel("time (ms); red line: the step's end")
    if title:
        fig.suptitle(title)
    _legend(axes[-1, 0])
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def write_timeline(rows: Sequence[Sequence[TimedAction]], path: str | Path, title: str = "") -> Path:
    """Write a PNG for ``*.png`` paths and a Chrome trace for ``*.json`` paths."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return write_timeline_png(rows, path, title)
    if suffix == ".json":
        return write_chrome_trace(rows, path, title or "pipeline")
    raise ValueError(f"cannot tell the output format of {str(path)!r}: name it *.png (timeline) or *.json (Chrome trace)")
