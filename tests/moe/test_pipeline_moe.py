"""MoE pipelines on gloo: overlap on == overlap off == a reference, for P=2 × EP=2 and P=4 × EP=1 (dualpipev),
and P=2 × EP=2 with dualpipe (mirrored chunks, mirror-gradient sync).

Both cases run in ONE spawned 4-process job (spawning costs seconds per process here). What is compared:

1. overlap on vs off: losses and every gradient bit-exact (``torch.equal``), on every process. The
   forward of one chunk and the backward of the other touch disjoint state and run the same kernels.
2. pipeline vs a P=1 × EP reference: the whole model, no pipeline, micro-batch after micro-batch, with
   the experts over the same EP group (run by the stage-0 process of each replica after the pipeline).
   Bit-exact: the same rows reach the same experts in the same order, and gradients accumulate in the
   pipeline's order (each stage's micro-batches in order; dualpipe's two directions summed at the end).
3. pipeline vs a dense single-process reference (every token through its k experts with a plain loop,
   the full expert set, each replica's data; expert gradients summed over the replicas, since every
   expert serves both replicas): ``rtol=1e-5, atol=1e-6``, because the dense loop groups the rows of an
   expert's matmul and the sums differently. This is the check that dispatch and combine compute MoE.

The data make loads uneven and, in micro-batch 1 (one repeated token), leave most experts with zero
tokens; the test asserts the routing really did both.
"""

from __future__ import annotations

import pytest
import torch

from dualpipe_plugin.launch import run_local
from tests.moe.harness import MoECase, dense_reference, is_expert, run_cases

pytestmark = pytest.mark.slow

CASES = [
    MoECase(ranks=2, ep=2, microbatches=4, blocks=8),
    MoECase(ranks=4, ep=1, microbatches=8, blocks=8),
    MoECase(ranks=2, ep=2, microbatches=4, blocks=4, schedule="dualpipe"),
]
IDS = [f"{c.schedule}-P{c.ranks}xEP{c.ep}" for c in CASES]


@pytest.fixture(scope="module")
def runs() -> list[list[dict]]:
    per_rank = run_local(run_cases, 4, args=(CASES,), timeout_s=300)
    return [[per_rank[rank][index] for rank in range(4)] for index in range(len(CASES))]


def _equal(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _merged(reports: list[dict], replica: int, key: str) -> tuple[dict, dict]:
    """Losses and gradients of one replica's pipeline, merged over its stages."""
    losses, grads = {}, {}
    for report in reports:
        if report["replica"] == replica:
            losses.update(report[key]["losses"])
            grads.update(report[key]["grads"])
    return losses, grads


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_overlap_on_equals_off(runs, index) -> None:
    for report in runs[index]:
        on, off = report["on"], report["off"]
        assert on["engine"] and not off["engine"]
        assert on["pair_events"] > 0, "no F&B pair went through the overlap engine"
        assert on["losses"].keys() == off["losses"].keys()
        assert all(torch.equal(on["losses"][g], off["losses"][g]) for g in on["losses"])
        assert on["grads"].keys() == off["grads"].keys()
        differing = [n for n in on["grads"] if not _equal(on["grads"][n], off["grads"][n])]
        assert not differing, f"rank {report['stage_rank']} of replica {report['replica']}: {differing}"
        assert torch.equal(on["loss"], off["loss"])


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_pipeline_equals_ep_reference(runs, index) -> None:
    case = CASES[index]
    for replica in range(case.ep):
        reference = next(r["reference"] for r in runs[index] if r["replica"] == replica and r["stage_rank"] == 0)
        losses, grads = _merged(runs[index], replica, "on")
        assert losses.keys() == set(range(case.microbatches))
        assert all(torch.equal(losses[g], reference["losses"][g]) for g in losses)
        assert grads.keys() == reference["grads"].keys()
        differing = [n for n in grads if not _equal(grads[n], reference["grads"][n])]
        assert not differing, f"replica {replica}: {differing}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_pipeline_matches_dense_reference(runs, index) -> None:
    case = CASES[index]
    dense = dense_reference(case)
    counts = torch.stack(dense["routing"])  # (replica · micro-batch · block, E)
    assert (counts == 0).any(), "the data left no expert without tokens"
    assert (counts.max(1).values > counts.min(1).values).all(), "expert loads were not uneven"
    expert_sum = {}
    for replica in dense["replicas"]:
        for name, grad in replica["grads"].items():
            if is_expert(name) and grad is not None:
                expert_sum[name] = grad if name not in expert_sum else expert_sum[name] + grad
    for replica in range(case.ep):
        losses, grads = _merged(runs[index], replica, "on")
        expected = dense["replicas"][replica]
        for g in losses:
            torch.testing.assert_close(losses[g], expected["losses"][g], rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            want = expert_sum.get(name) if is_expert(name) else expected["grads"][name]
            if want is None:
                assert grad is None or not grad.any(), name
            else:
                torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
