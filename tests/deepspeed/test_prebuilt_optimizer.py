"""A pre-built optimizer with parameter groups and a scheduler bound to it, through ``deepspeed.initialize``.

The script builds torch AdamW over two groups (weight decay on matrices, none on biases) and a LambdaLR
warm-up, then hands both to ``deepspeed.initialize`` (harness ``client_optimizer``). With
``"schedule": "dualpipev"`` the engine rebuilds this rank's layers inside ``initialize``; the optimizer and
the scheduler must follow them by global parameter name. Compared with DeepSpeed's own TrainSchedule given
the same pre-built objects, in the same processes: fp32, bit for bit (every parameter's math is the same
elementwise update; nothing sums across parameters without clipping).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .harness import Case, RunResult, assert_bit_exact, merge_rank_params, run_deepspeed_cases  # noqa: E402
from .harness import assert_refused_on_every_rank, run_optimizer_refusal_rank  # noqa: E402


def _ours(case: Case, schedule: str) -> Case:
    return replace(case, plugin=True, pipeline={"schedule": schedule})


def _run_many(cases: list[Case]) -> list[list]:
    per_rank = run_local(run_deepspeed_cases, cases[0].world_size, args=(cases,), timeout_s=300)
    return [[rank_results[index] for rank_results in per_rank] for index in range(len(cases))]


def _assert_equal_to_stock(ours, stock) -> None:
    assert_bit_exact(ours, RunResult(stock[0].losses, merge_rank_params(stock)))
    for dp_id in {r.dp_id for r in stock}:
        assert merge_rank_params(ours, dp_id).keys() == merge_rank_params(stock, dp_id).keys()
        assert all(torch.equal(merge_rank_params(ours, dp_id)[n], value)
                   for n, value in merge_rank_params(stock, dp_id).items())


@pytest.mark.slow
@pytest.mark.deepspeed
def test_prebuilt_adamw_groups_and_scheduler_p2() -> None:
    """P=2, eight runs in one spawn, each against TrainSchedule given the same arguments:

    * adamw: the pre-built AdamW (two groups) + LambdaLR bound to it;
    * layerwise: the decay group's lr depends on the stage that built it, so under dualpipev rank 0's
      decay group splits in two and the scheduler's per-group lists follow the split;
    * groups: the two groups as model_parameters, the config's AdamW and WarmupDecayLR (JSON "scheduler");
    * callable: the two groups, an optimizer callable and a scheduler callable (lr_scheduler=).
    """
    base = Case(num_stages=2, client="adamw", lr=0.01, steps=4, eval_after=True)
    variants = [base, replace(base, client="layerwise"), replace(base, client="groups"), replace(base, client="callable")]
    runs = _run_many([c for case in variants for c in (_ours(case, "dualpipev"), case)])
    ours, stock, ours_lw = runs[0], runs[1], runs[2]
    assert {r.engine for r in ours} == {"DualPipeEngine:dualpipev"} and {r.engine for r in stock} == {"PipelineEngine"}
    for index in range(0, len(runs), 2):
        _assert_equal_to_stock(runs[index], runs[index + 1])
    # the layer-wise groups: rank 0 holds stage 0 (lr x1) and stage 3 (built by rank 1: lr x2) -> 3 groups
    by_rank = {r.stage_id: r.extras["group_lrs"] for r in ours_lw}
    assert len(by_rank[0]) == 3 and by_rank[0][1] == pytest.approx(2 * by_rank[0][0])
    assert ours[0].losses != ours_lw[0].losses, "the layer-wise learning rates change the training"


@pytest.mark.slow
@pytest.mark.deepspeed
def test_prebuilt_optimizer_dp2_pp2_zero1() -> None:
    """P=2 x DP=2 (4 processes), ZeRO-1 over the pre-built AdamW (DeepSpeed wraps the client optimizer)."""
    case = Case(num_stages=2, dp=2, zero_stage=1, client="adamw", lr=0.01, steps=3)
    ours, stock = _run_many([_ours(case, "dualpipev"), case])
    _assert_equal_to_stock(ours, stock)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_what_cannot_follow_is_refused_on_every_rank() -> None:
    errors = run_local(run_optimizer_refusal_rank, 2, timeout_s=240)
    expected = {
        "stepped": r"already holds optimizer state \(rank 0: \d+, rank 1: \d+ parameter\(s\)\): it has stepped.*"
                   r"freshly built optimizer",
        "lbfgs": r"also keeps its parameters in optimizer\._params, outside param_groups.*pass a callable",
        "foreign": r"holds tensors that are not parameters of the PipelineModule \(rank 0: 1\)",
        "tied_conflict": r"parameter 'tied_modules\.proj\.weight' .* group 0 on pipeline rank 0 but in group 1 on "
                         r"pipeline rank 1 .*same rule on every rank",
        "mixed_model_parameters": r"mixes parameter-group dicts and tensors",
        # raised where the scheduler lacks the entry (rank 0) and, through the exchange, on rank 1 too
        "scheduler_missing_group": r"^pipeline rank 0: .*group\(s\) \[1\], which its LR scheduler \(LambdaLR, "
                                   r"lr_lambdas: 1 value\(s\)\) has no entry for",
    }
    assert_refused_on_every_rank(errors, expected, one_line=True)
