"""DeepSpeed checkpoints across schedules, pipeline and data-parallel sizes (dualpipe_plugin.deepspeed.checkpoint).

Each test runs a chain of "legs" in one spawn (harness ``run_legs_rank``: a fresh engine per leg, loading
the previous leg's checkpoint from disk): dualpipev saves, DeepSpeed's TrainSchedule ("schedule":
"deepspeed" with the plugin imported) resumes it and saves, dualpipev resumes that, 1f1b resumes that.
Every leg trains the next step of the same data; the uninterrupted dualpipev run is the reference: each
leg's loss and the last leg's parameters must equal it bit for bit (fp32, untied: the schedules then do
the same math in the same order, see test_dualpipe_engine.py). Refusals: one error, the same on every
rank, naming load_module_only=True; the weights-only load that the error names then works.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import replace

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .harness import Case, Leg, run_legs_rank  # noqa: E402

STEPS = 5


def _ours(case: Case, schedule: str, **changes) -> Case:
    return replace(case, plugin=True, pipeline={"schedule": schedule}, **changes)


def _journey(base: Case) -> list[Leg]:
    """The reference run, then dualpipev -> TrainSchedule -> dualpipev -> 1f1b, one checkpoint between each."""
    return [
        Leg(_ours(base, "dualpipev"), steps=tuple(range(STEPS))),
        Leg(_ours(base, "dualpipev"), steps=(0, 1), save="v1"),
        Leg(_ours(base, "deepspeed"), steps=(2,), load="v1", save="ds2"),
        Leg(_ours(base, "dualpipev"), steps=(3,), load="ds2", save="v3"),
        Leg(_ours(base, "1f1b"), steps=(4,), load="v3"),
    ]


def _merged(per_rank: list[list[dict]], leg: int, key: str, dp_id: int) -> dict[str, torch.Tensor]:
    merged = {}
    for reports in per_rank:
        if reports[leg]["dp_id"] == dp_id:
            merged.update(reports[leg][key])
    return merged


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _assert_journey_exact(per_rank: list[list[dict]]) -> None:
    engines = [per_rank[0][i]["engine"] for i in range(5)]
    assert engines == ["DualPipeEngine:dualpipev", "DualPipeEngine:dualpipev", "DualPipeEngine:deepspeed",
                       "DualPipeEngine:dualpipev", "DualPipeEngine:1f1b"]
    for reports in per_rank:
        reference = reports[0]["losses"]
        assert all(r["error"] is None for r in reports[:5]), [r["error"] for r in reports[:5]]
        assert [r["global_steps"] for r in reports[1:5]] == [0, 2, 3, 4]
        assert [loss for r in reports[1:5] for loss in r["losses"]] == reference
    for dp_id in {reports[0]["dp_id"] for reports in per_rank}:
        assert _equal(_merged(per_rank, 4, "params", dp_id), _merged(per_rank, 0, "params", dp_id)), dp_id
        # what TrainSchedule loaded is what dualpipev saved (after step 1: leg 1's state)
        assert _equal(_merged(per_rank, 2, "loaded", dp_id), _merged(per_rank, 1, "params", dp_id)), dp_id


def _error(report: dict, pattern: str) -> None:
    assert report["error"] is not None, "no error"
    kind, message, is_value_error = report["error"]
    assert (kind, is_value_error) == ("CheckpointPlacementError", True), report["error"]
    assert re.search(pattern, message), message
    assert "\n" not in message


def _run(legs: list[Leg], world_size: int) -> list[list[dict]]:
    with tempfile.TemporaryDirectory() as directory:
        return run_local(run_legs_rank, world_size, args=(legs, directory), timeout_s=600)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_dense_resume_across_schedules_and_refusals() -> None:
    """P=2, fp32, the script's own AdamW (two groups) + LambdaLR: a torch optimizer's state, re-sharded by name
    through the placement record. Then: a checkpoint DeepSpeed wrote without the plugin (no record) is refused
    in full under dualpipev and loads weights-only; another kind of optimizer state (ZeRO-1) is refused; a
    damaged record is refused."""
    base = Case(num_stages=2, client="adamw", lr=0.01)
    stock = replace(base, plugin=False)
    legs = _journey(base) + [
        Leg(stock, steps=(0,), save="stock"),
        Leg(_ours(base, "dualpipev"), load="stock"),
        Leg(_ours(base, "dualpipev"), load="stock", module_only=True),
        Leg(_ours(base, "dualpipev", zero_stage=1), load="ds2"),
        Leg(_ours(base, "dualpipev"), load="ds2", damage_record=True),
    ]
    per_rank = _run(legs, base.world_size)
    _assert_journey_exact(per_rank)
    for reports in per_rank:
        _error(reports[6], r"cannot load checkpoint .*/stock into this engine \(schedule 'dualpipev'.*written by "
                           r"DeepSpeed without dualpipe_plugin \(no dualpipe_placement.json\).*found on global rank\(s\) "
                           r"\[0, 1\]; nothing was loaded on any rank\). Fix: load the weights only with "
                           r"load_checkpoint\(\.\.\., load_module_only=True\)")
        assert reports[7]["error"] is None
        _error(reports[8], r"its optimizer state is a torch optimizer's state .* this engine keeps DeepSpeed's "
                           r"partitioned fp32 state .*load_module_only=True")
        _error(reports[9], r"dualpipe_placement.json is damaged or not written by this dualpipe_plugin")
    assert [r[6]["error"] for r in per_rank] == [per_rank[0][6]["error"]] * 2, "the same error on every rank"
    stock_weights = _merged(per_rank, 5, "params", 0)
    assert _equal(_merged(per_rank, 7, "loaded", 0), stock_weights), "weights-only load of DeepSpeed's checkpoint"


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero1_dp2_resume_across_schedules_and_sizes() -> None:
    """P=2 x DP=2, ZeRO-1 (partitioned flat fp32 state, re-sharded by name through DeepSpeed's own universal
    loader). Then the dualpipev checkpoint of P=2 x DP=2 resumed on P=4 x DP=1 (the same 4 processes): every
    weight, fp32 master and Adam moment arrives where the new placement keeps it, bit for bit. And a tied
    weight's state, saved by both of TrainSchedule's copies, loads once into dualpipev's single copy."""
    base = Case(num_stages=2, dp=2, zero_stage=1, optimizer="adam", lr=0.01)
    journey = _journey(base)
    journey[3] = replace(journey[3], optimizer_snapshot=True)
    four = replace(base, num_stages=4, dp=1, micro_batches=8)
    tied = replace(base, tied=True)
    per_rank = _run(journey + [
        Leg(_ours(four, "dualpipev"), steps=(4,), load="v3", optimizer_snapshot=True),
        # a tied weight: TrainSchedule saves a copy (and its state) on both pipeline ranks, dualpipev holds one
        Leg(_ours(tied, "deepspeed"), steps=(0, 1), save="tied", optimizer_snapshot=True),
        Leg(_ours(tied, "dualpipev"), load="tied", optimizer_snapshot=True),
    ], base.world_size)
    _assert_journey_exact(per_rank)
    for saved_leg, loaded_leg in ((6, 7),):
        saved, loaded = {}, {}
        for reports in per_rank:
            if reports[saved_leg]["dp_id"] == 0:
                saved.update(reports[saved_leg]["optimizer"])
            loaded.update(reports[loaded_leg]["loaded_optimizer"])
        assert saved.keys() == loaded.keys() and "tied_modules.proj.weight" in saved
        assert all(torch.equal(saved[n][k], loaded[n][k]) for n in saved for k in saved[n]), "tied state"
    saved_weights = _merged(per_rank, 3, "params", 0)
    saved_state = {}
    for reports in per_rank:
        if reports[3]["dp_id"] == 0:
            saved_state.update(reports[3]["optimizer"])
    loaded_state = {}
    for reports in per_rank:
        loaded_state.update(reports[5]["loaded_optimizer"])
        assert reports[5]["error"] is None and reports[5]["global_steps"] == 4
        assert all(0.0 < loss < 10.0 for loss in reports[5]["losses"])
    assert _equal(_merged(per_rank, 5, "loaded", 0), saved_weights)
    assert saved_state.keys() == loaded_state.keys() == saved_weights.keys()
    for name, entry in saved_state.items():
        assert entry.keys() == loaded_state[name].keys() == {"exp_avg", "exp_avg_sq", "fp32"}
        assert all(torch.equal(entry[key], loaded_state[name][key]) for key in entry), name


@pytest.mark.slow
@pytest.mark.deepspeed
def test_moe_resume_across_schedules() -> None:
    """DeepSpeed MoE layers (deepspeed.moe.layer.MoE, 4 experts, EP=2 over the data-parallel ranks), P=2 x DP=2:
    expert files (named by local MoE index and pipeline rank) and expert optimizer state follow the experts
    by global layer and expert id. The MoE layers are the middle four: both of TrainSchedule's stages hold
    some, dualpipev's rank 0 (first and last stage) none - it must still join the expert groups' creation,
    and its dense-only files mix with the MoE ranks' in one checkpoint. Then a MoE checkpoint DeepSpeed wrote
    without the plugin: refused in full, weights-only under dualpipev works."""
    base = Case(num_stages=2, dp=2, optimizer="adam", lr=0.01, moe=(2, 3, 4, 5))
    stock = replace(base, plugin=False)
    legs = _journey(base) + [
        Leg(stock, steps=(0,), save="stock"),
        Leg(_ours(base, "dualpipev"), load="stock"),
        Leg(_ours(base, "dualpipev"), load="stock", module_only=True),
        # fp32 clipping: the replicas hold other experts, so they must agree on one norm (DeepSpeed averages it)
        Leg(_ours(base, "dualpipev", gradient_clipping=0.05), steps=(0, 1)),
        # ZeRO-1 norms group by group over the pipeline: rank 0's missing MoE groups are refused, not a hang
        Leg(_ours(base, "dualpipev", zero_stage=1)),
    ]
    per_rank = _run(legs, base.world_size)
    _assert_journey_exact(per_rank)
    for reports in per_rank:
        _error(reports[6], r"written by DeepSpeed without dualpipe_plugin.*load_module_only=True")
        assert reports[7]["error"] is None
        kind, message, _ = reports[9]["error"]
        assert kind == "DeepSpeedPipelineConfigError" and re.search(
            r"different numbers of optimizer parameter groups \(rank 0: 1, rank 1: 2;.*first step would hang", message)
    assert len({r[9]["error"] for r in per_rank}) == 1, "the same error on every rank"
    for dp_id in (0, 1):
        assert _equal(_merged(per_rank, 7, "loaded", dp_id), _merged(per_rank, 5, "params", dp_id)), dp_id
    dense = [{n: v for n, v in _merged(per_rank, 8, "params", dp_id).items() if "experts" not in n} for dp_id in (0, 1)]
    assert _equal(*dense), "the data-parallel replicas' dense weights stay identical under clipping"
