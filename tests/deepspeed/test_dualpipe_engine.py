"""The DualPipe engine inside real DeepSpeed 0.19.8 (gloo/CPU), against DeepSpeed's own TrainSchedule.

Every run goes through ``deepspeed.initialize`` after ``import dualpipe_plugin.deepspeed``, with
``"pipeline": {"schedule": ...}`` in the config (harness ``Case(plugin=True, pipeline=...)``). The
comparison is with harness.reference_run, which test_deepspeed_baseline.py pins to DeepSpeed's
TrainSchedule bit for bit on the same model, data and seed; where a test says "stock" it runs DeepSpeed's
own engine next to ours.

Where results are not bit-exact, the reason is the order of fp32 sums, never the math:
  * dualpipe: each stage has two copies, each accumulating the gradients of half the micro-batches; the
    halves are added once at the end (DualPipe's mirror sum), where TrainSchedule accumulates all
    micro-batches in one sequence. Observed: parameters within 3e-7 of TrainSchedule after 3 Adam steps.
  * a tied pair on ONE rank (dualpipev's first and last stage both live on rank 0): one module
    accumulates both uses interleaved in schedule order, where TrainSchedule keeps one copy per stage and
    adds the two sums at the end (ReduceTiedGrads). Observed: within 2e-7 after 3 Adam steps.
  * fp32 clipping without ZeRO: our engine clips with the global norm (DeepSpeed's own fp32 rule counts
    only pipeline stage 0's parameters, a different slice under a V); the reference computes the same norm
    in another order.
"""

from __future__ import annotations

import glob
import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .harness import (  # noqa: E402
    Case,
    RunResult,
    assert_bit_exact,
    launch_case,
    merge_rank_params,
    params_max_diff,
    reference_run,
    run_bad_input_rank,
    run_checkpoint_rank,
    run_config_file_rank,
    run_deepspeed_cases,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p", "zbv")
V_SCHEDULES = ("dualpipev", "zbv")  # first and last stage on rank 0


def _ours(case: Case, schedule: str | None, **pipeline) -> Case:
    settings = dict(case.pipeline, **pipeline)
    if schedule is not None:
        settings["schedule"] = schedule
    return replace(case, plugin=True, pipeline=settings)


def _assert_close(results, ref, *, loss_rel: float, param_abs: float) -> None:
    for result in results:
        assert result.losses == results[0].losses, "every rank reports the same loss"
        assert result.losses == pytest.approx(ref.losses, rel=loss_rel)
        if ref.eval_loss is not None:
            assert result.eval_loss == pytest.approx(ref.eval_loss, rel=loss_rel)
    for dp_id in {r.dp_id for r in results}:
        diffs = params_max_diff(merge_rank_params(results, dp_id), ref.params)
        assert max(diffs.values()) <= param_abs, diffs


# --- registration and config parsing (no processes) ----------------------------------------------------


@pytest.fixture
def leaves_deepspeed_as_found():
    """These tests import the plugin in pytest's own process: give deepspeed back as they found it."""
    import deepspeed

    registered = deepspeed.PipelineEngine.__name__ == "DualPipeEngine"
    yield
    import dualpipe_plugin.deepspeed as plugin

    (plugin.register if registered else plugin.unregister)()


@pytest.mark.usefixtures("leaves_deepspeed_as_found")
def test_import_registers_a_pipeline_engine_subclass() -> None:
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule

    import dualpipe_plugin.deepspeed as plugin

    from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine

    assert deepspeed.PipelineEngine is plugin.DualPipeEngine and issubclass(plugin.DualPipeEngine, PipelineEngine)
    assert deepspeed.DualPipeVEngine is plugin.CheckedDualPipeVEngine
    assert issubclass(plugin.CheckedDualPipeVEngine, DualPipeVEngine)
    observed = PipelineModule._partition_layers
    plugin.register()  # idempotent
    assert deepspeed.PipelineEngine is plugin.DualPipeEngine and PipelineModule._partition_layers is observed
    plugin.unregister()
    try:
        assert deepspeed.PipelineEngine is PipelineEngine and not plugin.is_registered()
        assert deepspeed.DualPipeVEngine is DualPipeVEngine
        assert PipelineModule._partition_layers is observed.__wrapped__
    finally:
        plugin.register()
    assert plugin.is_registered()


@pytest.mark.usefixtures("leaves_deepspeed_as_found")
def test_pipeline_options() -> None:
    from dualpipe_plugin.deepspeed import DeepSpeedPipelineConfigError, read_pipeline_options

    assert read_pipeline_options({}) is None
    assert read_pipeline_options({"schedule": "DeepSpeed"}) is None
    options = read_pipeline_options({"schedule": "DualPipeV", "overlap": True, "timeout_s": 30})
    assert (options.schedule.name, options.overlap, options.split_weights, options.timeout_s) == ("dualpipev", True, True, 30.0)
    with pytest.raises(DeepSpeedPipelineConfigError, match="valid schedules: dualpipe, dualpipev, 1f1b, zb1p, zbv, deepspeed"):
        read_pipeline_options({"schedule": "gpipe"})
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        read_pipeline_options({"schedule": "1f1b", "timeout_s": 0})


# --- the same model, data and seed as TrainSchedule --------------------------------------------------------


def _run_many(cases: list[Case]) -> list[list]:
    """Several cases in ONE spawn (same processes, one engine after the other): per case, the rank results."""
    per_rank = run_local(run_deepspeed_cases, cases[0].world_size, args=(cases,), timeout_s=300)
    return [[rank_results[index] for rank_results in per_rank] for index in range(len(cases))]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_without_a_schedule_the_engine_is_deepspeeds() -> None:
    """No "schedule" key: our engine class is built, and every step equals stock DeepSpeed's bit for bit."""
    case = Case(num_stages=2, tied=True, optimizer="adam", lr=0.01, partition_method="parameters",
                activation_checkpoint_interval=2, eval_after=True)
    ours, stock = _run_many([replace(case, plugin=True), case])
    assert {r.engine for r in ours} == {"DualPipeEngine:deepspeed"}
    assert {r.engine for r in stock} == {"PipelineEngine"}
    for a, b in zip(ours, stock):
        assert (a.losses, a.eval_loss) == (b.losses, b.eval_loss)
        assert a.params.keys() == b.params.keys()
        assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    assert_bit_exact(ours, reference_run(case))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_schedules_match_train_schedule() -> None:
    """Each schedule at P=2: Adam, DeepSpeed's 'parameters' partition, activation checkpointing (interval
    2) together with the W split, a tied input/output projection across ranks, then eval_batch.

    Bit-exact for 1f1b, zb1p, dualpipev and zbv; dualpipe within 1e-6 (mirror halves, see the module note).
    The V schedules run untied here: their first and last stage share rank 0 (see the tie test below).
    """
    base = Case(num_stages=2, optimizer="adam", lr=0.01, partition_method="parameters",
                activation_checkpoint_interval=2, eval_after=True)
    cases = {schedule: replace(base, tied=schedule not in V_SCHEDULES) for schedule in SCHEDULES}
    runs = _run_many([_ours(case, schedule) for schedule, case in cases.items()])
    for (schedule, case), results in zip(cases.items(), runs):
        assert {r.engine for r in results} == {f"DualPipeEngine:{schedule}"}
        ref = reference_run(case)
        if schedule == "dualpipe":
            _assert_close(results, ref, loss_rel=1e-6, param_abs=1e-6)
        else:
            assert_bit_exact(results, ref)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_dualpipev_four_ranks_bit_exact() -> None:
    case = Case(num_stages=4, micro_batches=8, num_layers=12, eval_after=True)
    assert_bit_exact(launch_case(_ours(case, "dualpipev")), reference_run(case))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_tie_on_one_rank_clipping_and_overlap_path() -> None:
    """Two dualpipev runs in one spawn.

    1. The first/last tie on rank 0 (one module, no exchange) and fp32 clipping by the global norm.
    2. Layers with sub_stages() and "overlap": true: F&B pairs go through the overlap engine; bit-exact.
    """
    tie = Case(num_stages=2, tied=True, gradient_clipping=0.002)
    staged = Case(num_stages=2, staged=True, optimizer="adam", lr=0.01, eval_after=True)
    tied_results, staged_results = _run_many([_ours(tie, "dualpipev"), _ours(staged, "dualpipev", overlap=True)])

    _assert_close(tied_results, reference_run(tie, global_clip=True), loss_rel=1e-6, param_abs=1e-7)
    unclipped = reference_run(replace(tie, gradient_clipping=0.0))
    assert tied_results[0].losses[1:] != pytest.approx(unclipped.losses[1:], rel=1e-4), "the clip is active"

    assert {r.engine for r in staged_results} == {"DualPipeEngine:dualpipev+overlap"}
    assert_bit_exact(staged_results, reference_run(staged))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero1_with_data_parallel() -> None:
    """P=2 x DP=2 (4 processes), ZeRO-1, Adam, eval_batch: dualpipev bit-exact; dualpipe (with a tie across
    its ranks, and clipping: ZeRO-1's global norm must count each mirrored stage once) within 1e-6."""
    base = Case(num_stages=2, dp=2, zero_stage=1, optimizer="adam", lr=0.01, eval_after=True)
    clipped = replace(base, tied=True, optimizer="sgd", lr=0.05, gradient_clipping=0.002)
    cases = {"dualpipev": base, "dualpipe": clipped}
    runs = _run_many([_ours(case, schedule) for schedule, case in cases.items()])
    for (schedule, case), results in zip(cases.items(), runs):
        assert sorted((r.stage_id, r.dp_id) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        if schedule == "dualpipe":
            _assert_close(results, reference_run(case), loss_rel=1e-6, param_abs=1e-6)
            unclipped = reference_run(replace(case, gradient_clipping=0.0))
            assert results[0].losses[1:] != pytest.approx(unclipped.losses[1:], rel=1e-4), "the clip is active"
        else:
            assert_bit_exact(results, reference_run(case))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_bf16_against_deepspeeds_bf16() -> None:
    """bf16 against DeepSpeed's own bf16 TrainSchedule runs (not the fp32 reference), all in one spawn.

    dualpipev with BF16_Optimizer (ZeRO-0) folds each op's bf16 gradients into the fp32 accumulation in
    the order TrainSchedule does: bit-exact. dualpipe with ZeRO-1 and fp32 gradient accumulation
    (BF16_Optimizer; the mirror sum acts on its fp32 gradients) adds its mirror copies in another order
    (module note), so a bf16 weight may round the other way: tolerance one bf16 step (2**-8 for |w| < 0.5).
    """
    v_case = Case(num_stages=2, bf16=True)
    d_case = Case(num_stages=2, bf16=True, zero_stage=1, bf16_fp32_accumulation=True, tied=True,
                  optimizer="adam", lr=0.01)
    v_ours, v_stock, d_ours, d_stock = _run_many(
        [_ours(v_case, "dualpipev"), v_case, _ours(d_case, "dualpipe"), d_case])
    v_ref = merge_rank_params(v_stock)
    assert_bit_exact(v_ours, RunResult(v_stock[0].losses, v_ref))
    _assert_close(d_ours, RunResult(d_stock[0].losses, merge_rank_params(d_stock)), loss_rel=1e-3,
                  param_abs=2.0**-8)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_checkpoint_resume_and_portability(tmp_path) -> None:
    """dualpipe (two copies of each stage): save after 2 steps, train a 3rd; new processes load and redo the
    3rd step bit for bit. The layer files also load into DeepSpeed's own engine and back."""
    case = _ours(Case(num_stages=2, tied=True, optimizer="adam", lr=0.01), "dualpipe")
    saved = run_local(run_checkpoint_rank, 2, args=(case, str(tmp_path), "save"), timeout_s=240)
    resumed = run_local(run_checkpoint_rank, 2, args=(case, str(tmp_path), "resume"), timeout_s=240)
    files = sorted(os.listdir(tmp_path / "ours"))
    # one file per layer by global index (the tied output use has no state of its own, as in DeepSpeed)
    assert [f for f in files if f.startswith("layer_")] == [f"layer_{i:02d}-model_states.pt" for i in range(9)]
    for before, after in zip(saved, resumed):
        assert after["global_steps"] == 3
        assert after["losses"] == before["losses"][2:]
        for snapshot in ("loaded", "from_stock"):
            assert all(torch.equal(after[snapshot][n], before["saved"][n]) for n in before["saved"]), snapshot
        assert all(torch.equal(after["final"][n], before["final"][n]) for n in before["final"])
        # DeepSpeed's engine read our files into its own stage: its parameters are the saved ones
        assert before["stock_loaded"] and all(
            torch.equal(value, before["saved"][n]) for n, value in before["stock_loaded"].items())


@pytest.mark.slow
@pytest.mark.deepspeed
def test_bad_input_fails_at_initialize() -> None:
    per_rank = run_local(run_bad_input_rank, 2, timeout_s=240)
    assert per_rank[0] == per_rank[1], "every rank raises the same errors"
    errors = per_rank[0]
    expected = {
        "unknown_schedule": "valid schedules: dualpipe, dualpipev, 1f1b, zb1p, zbv, deepspeed",
        "dualpipe_odd_stages": "num_stages=1 .*even number of pipeline ranks.*'dualpipev'",
        "too_few_microbatches": "gradient_accumulation_steps=3 .*at least 2 x ranks = 4",
        "dualpipe_odd_microbatches": "must be even, got microbatches=5; use 6",
        "zero2": "zero_optimization.stage=2 .*use stage 0 or 1",
        "dynamic_shape": "dynamic_shape=False",
        "bad_overlap_value": "pipeline.overlap must be true or false",
        "tensor_parallel_partitioned": '"pipe_partitioned": false and "grad_partitioned": false',
        "has_bool_tensors": "has_bool_tensors",
        "dualpipev_module": "not run for a DualPipeVModule: .*DualPipeVEngine, which ignores the key.*"
                            "build the model as deepspeed.pipe.PipelineModule",
        "eval_too_few_microbatches": "eval_batch with 2 micro-batches.*at least 2 x ranks = 4",
    }
    import re

    for name, pattern in expected.items():
        assert errors[name] is not None, f"{name}: no error"
        kind, message, is_value_error = errors[name]
        assert (kind, is_value_error) == ("DeepSpeedPipelineConfigError", True), (name, kind, message)
        assert re.search(pattern, message), (name, message)
    assert errors["eval_kept_iterator"], "a refused eval_batch must leave the training iterator in place"
    assert errors["dualpipev_module_deepspeed"] == "CheckedDualPipeVEngine", "schedule 'deepspeed' keeps DeepSpeed's V"


@pytest.mark.slow
@pytest.mark.deepspeed
def test_shipped_configs_train_one_step() -> None:
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "deepspeed", "*.json")))
    assert [os.path.basename(p) for p in paths] == [
        "dualpipe.json", "dualpipe_zero1_bf16.json", "dualpipev.json", "dualpipev_zero1_bf16.json"]
    results = run_local(run_config_file_rank, 2, args=(paths,), timeout_s=240)
    for path in paths:
        name = os.path.basename(path)
        reports = [r[path] for r in results]
        assert all(r == reports[0] for r in reports), reports  # the loss is reported identically on both ranks
        report = reports[0]
        assert report["schedule"] == name.split("_")[0].removesuffix(".json")
        assert report["params_finite"] and 0.0 < report["loss"] < 10.0
        assert report["optimizer"] == ("BF16_Optimizer" if "bf16" in name else "AdamW")
