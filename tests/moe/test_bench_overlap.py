"""The overlap benchmark's pure pieces (its timings live in benchmarks/, never in tests)."""

from __future__ import annotations

from dualpipe_plugin.bench.overlap import _crossing, _interpolate


def test_crossing_interpolates_the_first_reach_of_the_target() -> None:
    paddings = (0, 1000, 2000, 4000)
    assert _crossing(paddings, [0.1, 0.3, 0.5, 0.7], 0.4) == 1500
    assert _crossing(paddings, [0.45, 0.5, 0.6, 0.7], 0.4) == 0  # already there without padding
    assert _crossing(paddings, [0.1, 0.2, 0.3, 0.35], 0.4) == 4000  # never reached: the largest
    assert _crossing(paddings, [0.1, 0.4, 0.3, 0.6], 0.4) == 1000  # noise: the first crossing wins


def test_interpolate() -> None:
    assert _interpolate((0, 10, 20), (1.0, 2.0, 4.0), 15) == 3.0
    assert _interpolate((0, 10, 20), (1.0, 2.0, 4.0), 30) == 4.0
