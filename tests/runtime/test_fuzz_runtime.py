"""Fuzzing for real: hypothesis samples small (schedule, P, C, options) cases, runs them on gloo and checks
losses and every gradient against the single-process reference, bit for bit."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualpipe_plugin.launch import run_local
from tests.runtime.harness import Case, by_case, compare_to_reference, reference, run_cases

pytestmark = pytest.mark.slow


@st.composite
def _case(draw) -> Case:
    name = draw(st.sampled_from(["dualpipe", "dualpipev", "1f1b", "zb1p"]))
    ranks = draw(st.sampled_from([2, 4] if name == "dualpipe" else [1, 2, 4]))
    if name == "dualpipe":
        microbatches = 2 * draw(st.integers(ranks, ranks + 2))
    elif name == "dualpipev":
        microbatches = draw(st.integers(2 * ranks, 2 * ranks + 3))
    else:
        microbatches = draw(st.integers(1, 2 * ranks + 3))
    return Case(
        name, ranks, microbatches,
        layers_per_stage=draw(st.integers(1, 2)),
        dim=draw(st.sampled_from([8, 16])),
        batch_per_microbatch=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 1000)),
        steps=draw(st.integers(1, 2)),
        checkpoint=draw(st.booleans()),
        vary_seq=draw(st.booleans()),
    )


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(_case(), min_size=6, max_size=6))
def test_sampled_cases_match_the_reference(cases):
    jobs = [("steps", case) for case in cases]
    results = by_case(run_local(run_cases, 4, args=(jobs,), timeout_s=240), jobs)
    for case, reports in zip(cases, results):
        compare_to_reference(case, reports, reference(case))
