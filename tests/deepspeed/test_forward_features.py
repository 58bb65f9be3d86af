"""DeepSpeed's engine-level forward behaviour under a schedule (see dualpipe_plugin/deepspeed/forward.py).

The chunks run the PipelineModule without ``DeepSpeedEngine.forward``; what that forward does is honoured
(torch_autocast, tested here against TrainSchedule; frozen parameters carried through the rebuild) or
refused at initialize, on every rank, with one line naming the fix.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .harness import Case, RunResult, assert_bit_exact, merge_rank_params, run_deepspeed_cases  # noqa: E402
from .harness import assert_refused_on_every_rank, run_forward_refusal_rank  # noqa: E402


def _run_many(cases: list[Case]) -> list[list]:
    per_rank = run_local(run_deepspeed_cases, cases[0].world_size, args=(cases,), timeout_s=300)
    return [[rank_results[index] for rank_results in per_rank] for index in range(len(cases))]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_torch_autocast_and_frozen_parameters_as_train_schedule() -> None:
    """torch_autocast bf16 (fp32 parameters, Adam): every matmul of every layer runs in bf16, on our engine as
    on TrainSchedule, and the losses and parameters are equal bit for bit; parameters frozen between building
    the module and initialize stay frozen on the rank that holds them after the rebuild."""
    case = Case(num_stages=2, autocast=True, optimizer="adam", lr=0.01, eval_after=True,
                frozen=("0.linear.weight", "7.linear.bias"))
    ours, stock = _run_many([replace(case, plugin=True, pipeline={"schedule": "dualpipev"}), case])
    assert {r.engine for r in ours} == {"DualPipeEngine:dualpipev"}
    for result in [*ours, *stock]:
        assert result.extras["matmul_dtypes"] == ["torch.bfloat16"], (result.engine, result.extras)
    assert_bit_exact(ours, RunResult(stock[0].losses, merge_rank_params(stock), stock[0].eval_loss))
    # dualpipev: rank 0 holds layers 0-1 and 6-7; the frozen ones keep requires_grad=False (and their values)
    assert {r.stage_id: r.extras["frozen"] for r in ours} == {0: ["0.linear.weight", "7.linear.bias"], 1: []}
    initial = {n: v for n, v in merge_rank_params(_run_many([replace(case, steps=0)])[0]).items() if n in case.frozen}
    assert all(torch.equal(merge_rank_params(ours)[n], v) for n, v in initial.items())


@pytest.mark.slow
@pytest.mark.deepspeed
def test_what_the_chunks_cannot_honour_is_refused() -> None:
    errors = run_local(run_forward_refusal_rank, 2, timeout_s=240)
    expected = {
        "autocast_with_overlap": r"pipeline.overlap .*DeepSpeed's forward behaviour for torch_autocast would be "
                                 r"skipped; set \"overlap\": false",
        "autotuning": r"runs the model without DeepSpeedEngine.forward, where DeepSpeed's autotuner measures",
        "compile": r"engine.compile\(\) is not supported with pipeline.schedule='dualpipev'",
        "adapter_injected": r"rebuilds this pipeline's layers from their LayerSpecs .*layer 5 \(DenseTanh\) was "
                            r"changed after the PipelineModule was built: it has .*LowRankAdapted at 'linear'",
        "user_hook_with_overlap": r"the 1 forward hook\(s\) registered on engine.module would not run",
    }
    assert_refused_on_every_rank(errors, expected)
