"""Render a schedule as a rank x step grid, marking the steps an error is about."""

from __future__ import annotations

from dualpipe_plugin.schedules.ir import Schedule

__all__ = ["format_grid"]


def format_grid(schedule: Schedule, marks: dict[int, int] | None = None, context: int = 6) -> str:
    """One line per rank; ``marks`` maps rank -> step index, shown as ``>>OP<<``.

    Long rows are cut to ``context`` steps either side of the mark so errors stay readable; rows without
    a mark are cut around the earliest mark of the other rows.
    """
    marks = marks or {}
    anchor = min(marks.values(), default=None)
    lines = []
    for rank, row in enumerate(schedule.actions):
        tokens = [str(action) for action in row]
        mark = marks.get(rank)
        if mark is not None and mark < len(tokens):
            tokens[mark] = f">>{tokens[mark]}<<"
        elif mark is not None:
            tokens.append(">>(end)<<")
        start, stop = 0, len(tokens)
        centre = mark if mark is not None else anchor
        if centre is not None and len(tokens) > 2 * context + 1:
            start, stop = max(0, centre - context), min(len(tokens), centre + context + 1)
        body = " ".join(tokens[start:stop])
        prefix = f"... (step {start}) " if start else ""
        suffix = " ..." if stop < len(tokens) else ""
        lines.append(f"  rank {rank}: {prefix}{body}{suffix}")
    return "\n".join(lines)
