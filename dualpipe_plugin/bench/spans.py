"""Step times from the ranks' own spans: every benchmark here measures a step the same way.

Each rank records ``(start, end)`` of every measured step with ``time.perf_counter`` (one monotonic clock
for all processes of a machine); a step lasts from the first rank's start to the last rank's end.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["step_times_ms"]


def step_times_ms(spans_per_rank: Sequence[Sequence[tuple[float, float]]]) -> list[float]:
    """Per measured step: ``max(end) - min(start)`` over the ranks, in ms."""
    return [
        (max(spans[i][1] for spans in spans_per_rank) - min(spans[i][0] for spans in spans_per_rank)) * 1e3
        for i in range(len(spans_per_rank[0]))
    ]
