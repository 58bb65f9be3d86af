"""Every schedule on gloo/CPU against a single-process reference: losses, gradients, peaks, total loss.

All comparisons are bit-exact (``torch.equal``) in fp32: the reference runs the whole model micro-batch by
micro-batch in the pipeline's accumulation order with one intra-op thread, the split weight gradients use
the same kernels as autograd, and dualpipe's mirror sync adds the two directions' sums once (``a + b`` is
commutative in IEEE arithmetic). The step's mean loss is summed in float64, exact for these few values.

Micro-batch counts: the minimum each schedule accepts, an odd count where allowed, and 3P. All cases run
in ONE spawned 4-process job (P=2 and P=1 cases on several pipelines side by side), because spawning
costs seconds per process here.
"""

from __future__ import annotations

import pytest
import torch

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.schedules import build_schedule, simulate
from tests.runtime.harness import Case, by_case, compare_to_reference, reference, run_cases

pytestmark = pytest.mark.slow


def _cases() -> list[Case]:
    cases = []
    # dualpipe: even C >= 2P, so no odd count exists; the minimum and 3P.
    for p in (2, 4):
        cases += [Case("dualpipe", p, 2 * p), Case("dualpipe", p, 3 * p)]
    # dualpipev: C >= 2P, odd allowed; P=1 is a two-stage V on one rank.
    for p, counts in ((1, (2, 3)), (2, (4, 5, 6)), (4, (8, 9, 12))):
        cases += [Case("dualpipev", p, c) for c in counts]
    # 1f1b / zb1p / zbv: any C >= 1, including fewer micro-batches than ranks (zbv: 2P stages in a V).
    cases += [Case("zbv", 1, 2)]
    for name in ("1f1b", "zb1p", "zbv"):
        for p, counts in ((2, (1, 3, 6)), (4, (1, 5, 12))):
            cases += [Case(name, p, c) for c in counts]
    return cases


CASES = _cases()
JOBS = [("steps", case) for case in CASES]


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    results = run_local(run_cases, 4, args=(JOBS,), timeout_s=240)
    return {case.id: reports for (_, case), reports in zip(JOBS, by_case(results, JOBS))}


def test_cases_cover_the_issue_grid() -> None:
    grid: dict[tuple[str, int], list[int]] = {}
    for c in CASES:
        grid.setdefault((c.schedule, c.ranks), []).append(c.microbatches)
    assert grid == {
        ("dualpipe", 2): [4, 6], ("dualpipe", 4): [8, 12],
        ("dualpipev", 1): [2, 3], ("dualpipev", 2): [4, 5, 6], ("dualpipev", 4): [8, 9, 12],
        ("1f1b", 2): [1, 3, 6], ("1f1b", 4): [1, 5, 12], ("zb1p", 2): [1, 3, 6], ("zb1p", 4): [1, 5, 12],
        ("zbv", 1): [2], ("zbv", 2): [1, 3, 6], ("zbv", 4): [1, 5, 12],
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_losses_and_gradients_equal_reference(runs, case: Case) -> None:
    reports = runs[case.id]
    # Every process reported: one copy per pipeline rank for each of the 4 // P pipelines.
    assert sorted(r["rank"] for r in reports) == sorted(list(range(case.ranks)) * (4 // case.ranks))
    compare_to_reference(case, reports, reference(case), exact=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_peak_activations_equal_simulator(runs, case: Case) -> None:
    expected = simulate(build_schedule(case.schedule, case.ranks, case.microbatches)).peak_activations_per_rank
    got = [(r["rank"], r["peaks"][0]) for r in runs[case.id]]
    assert got == [(rank, expected[rank]) for rank, _ in got], f"measured {got}, simulated {expected}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_total_loss_is_reference_mean_on_every_rank(runs, case: Case) -> None:
    mean = reference(case)["mean_loss"][0]
    for report in runs[case.id]:
        assert report["total_loss"] is not None
        assert torch.equal(report["total_loss"], mean), (
            f"rank {report['rank']}: StepResult.loss {report['total_loss'].item()!r} != reference {mean.item()!r}"
        )
