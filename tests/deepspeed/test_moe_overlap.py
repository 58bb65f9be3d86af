"""DeepSpeed's own MoE layer on the overlap protocol (dualpipe_plugin/deepspeed/moe_overlap.py).

Real ``deepspeed.moe.layer.MoE`` layers (TopKGate, Experts, all-to-all on DeepSpeed's expert-parallel
groups) inside blocks written as a DeepSpeed user writes them (tests/deepspeed/moe_harness.py), on gloo:

* one block at a time, 2 expert-parallel processes: the staged block equals the block bit for bit, run
  as a module and with its forward overlapped against another block's backward (the overlap engine's
  rule, W split on); a residual MoE, two MoE layers in one block; the refused patterns name their fix;
* whole pipelines, P=2 x EP=2 = 4 processes, ``deepspeed.initialize``: dualpipev with ``"overlap": true``
  runs F&B pairs through the overlap engine (all-to-alls in flight during the other side's compute) and
  gives the same losses and parameters, bit for bit, as overlap off and as DeepSpeed's TrainSchedule.

Where the comparison with TrainSchedule is not bit-exact, the cause is DeepSpeed's, not the overlap:
TrainSchedule back-propagates each floating-point output of a stage with its own backward call, so when
the aux loss travels as a second activation (``carry="tuple"``) the parameters feeding both outputs sum
their two gradient contributions in another order (one fp32 ulp). With the aux loss injected in backward
(``carry="inject"``, one activation tensor) TrainSchedule and ours agree bit for bit. Those runs use
``"split_weights": false``: the runtime's B/W split computes a Linear's input gradient with one matmul
that, on the non-contiguous per-expert slices DeepSpeed's Experts hand their experts, rounds differently
from autograd's for some shapes; with the split on, overlap on and off are compared with each other.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .moe_harness import MoECase, run_block_checks, run_engine_cases  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def test_staged_block_equals_the_block() -> None:
    good = ["plain", "residual", "two"]
    bad = {
        "inplace": "in-place operation add_ modifies a tensor computed before the MoE layer.*h = h \\+ y",
        "twice": "called an MoE layer more than once.*exactly once per forward",
        "function": "passes a tensor computed before it to _Twice.*h = h \\+ 0",
        "unused": "called its 1 MoE layer\\(s\\) 0 time\\(s\\).*exactly once per forward",
    }
    import re

    for rank, out in enumerate(run_local(run_block_checks, 2, args=(good + list(bad),), timeout_s=300)):
        for variant in good:
            result = out[variant]
            assert result["error"] is None, (variant, result["error"])
            ref, seq = result["reference"], result["sequential"]
            assert torch.equal(ref[0], seq[0]) and ref[1] == seq[1], variant
            assert torch.equal(ref[2], seq[2]) and not _equal(ref[3], seq[3]), variant
            pair, plain_b = result["pair"], result["plain_b"]
            assert torch.equal(pair["f_out"], ref[0]) and pair["f_total"] == ref[1], variant
            assert torch.equal(pair["b_input_grad"], plain_b[2]) and not _equal(pair["b_grads"], plain_b[3]), variant
            experts = [n for n in ref[3] if "deepspeed_experts" in n]
            assert experts and any(ref[3][n].abs().sum() > 0 for n in experts), "the experts got tokens"
        for variant, pattern in bad.items():
            kind, message = out[variant]["error"]
            assert kind == "DeepSpeedMoEOverlapError" and re.search(pattern, message), (rank, variant, message)
            assert '"overlap": false' in message


def _merged(results: list[dict], dp_id: int) -> dict:
    merged: dict = {}
    for result in results:
        if result["dp_id"] == dp_id:
            merged.update(result["params"])
    return merged


def test_pipeline_moe_overlap_bit_exact() -> None:
    """P=2 x EP=2, Adam, 2 steps: TrainSchedule; ours dualpipev with overlap off and on."""
    inject = MoECase(carry="inject")
    tuple_ = MoECase(carry="tuple")
    unsplit = {"schedule": "dualpipev", "split_weights": False}
    split = {"schedule": "dualpipev"}
    cases = {
        "inject/train_schedule": inject,
        "inject/off": replace(inject, plugin=True, pipeline=unsplit),
        "inject/on": replace(inject, plugin=True, pipeline=dict(unsplit, overlap=True)),
        "inject/split/off": replace(inject, plugin=True, pipeline=split),
        "inject/split/on": replace(inject, plugin=True, pipeline=dict(split, overlap=True)),
        "tuple/train_schedule": tuple_,
        "tuple/split/off": replace(tuple_, plugin=True, pipeline=split),
        "tuple/split/on": replace(tuple_, plugin=True, pipeline=dict(split, overlap=True)),
    }
    per_rank = run_local(run_engine_cases, 4, args=(list(cases.values()),), timeout_s=600)
    runs = {name: [rank[i] for rank in per_rank] for i, name in enumerate(cases)}

    for name, results in runs.items():
        overlap = name.endswith("/on")
        for result in results:
            assert result["losses"] == results[0]["losses"], "every rank reports the same loss"
            # Each rank's chunks hold staged DeepSpeed MoE blocks, and all-to-alls flew during the other
            # side's compute inside F&B pairs.
            assert (result["staged_blocks"] > 0) is overlap and (result["pairs_overlapped"] > 0) is overlap, name

    def same(a: str, b: str) -> None:
        assert runs[a][0]["losses"] == runs[b][0]["losses"], (a, b)
        for dp_id in (0, 1):
            assert not _equal(_merged(runs[a], dp_id), _merged(runs[b], dp_id)), (a, b, dp_id)

    for name in ("inject/off", "inject/on"):
        same(name, "inject/train_schedule")
    same("inject/split/on", "inject/split/off")
    same("tuple/split/on", "tuple/split/off")
    # Against TrainSchedule's per-output backward (module docstring): one fp32 ulp.
    ours, theirs = runs["tuple/split/on"], runs["tuple/train_schedule"]
    assert ours[0]["losses"] == pytest.approx(theirs[0]["losses"], rel=1e-6)
    for dp_id in (0, 1):
        a, b = _merged(ours, dp_id), _merged(theirs, dp_id)
        assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-6
