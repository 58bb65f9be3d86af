"""DeepSpeed's own pipeline engine (TrainSchedule) against the single-process reference of the harness.

These pin down DeepSpeed's arithmetic - the baseline our DualPipe engines are compared with. fp32 runs
match the reference bit for bit (losses, every parameter after 3 steps, eval loss); see the note at the
top of harness.py for what the reference reproduces. bf16 is checked against the fp32 reference with a
tolerance (bf16 weights and activations; DeepSpeed keeps fp32 masters and fp32 gradient accumulation).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest

pytest.importorskip("deepspeed")

from deepspeed.runtime.pipe import schedule  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: E402

from .harness import (  # noqa: E402
    Case,
    assert_bit_exact,
    initialize_pipeline_engine,
    launch_case,
    merge_rank_params,
    params_max_diff,
    reference_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(Case(num_stages=2, eval_after=True), id="P2-sgd-uniform-eval"),
        pytest.param(
            Case(num_stages=2, tied=True, optimizer="adam", lr=0.01, partition_method="parameters",
                 activation_checkpoint_interval=2),
            id="P2-tied-adam-parameters-actckpt",
        ),
    ],
)
def test_train_schedule_matches_reference_bit_exact(case: Case) -> None:
    assert_bit_exact(launch_case(case), reference_run(case))


def test_pipe_and_data_parallel_zero1_bit_exact() -> None:
    """P=2 x DP=2 with ZeRO-1 (partitioned optimizer states), a tied pair across stages and eval_batch."""
    case = Case(num_stages=2, dp=2, zero_stage=1, tied=True, optimizer="adam", lr=0.01, eval_after=True)
    results = launch_case(case)
    assert sorted((r.stage_id, r.dp_id) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert_bit_exact(results, reference_run(case))


def test_fp32_clipping_counts_stage0_parameters_only() -> None:
    """DeepSpeed's fp32 (no ZeRO) clip_grad_norm_ under a pipeline grid sums the norms of stage 0 only.

    ``clip_grad_norm_(mpu=grid)`` keeps a parameter when ``mpu.get_model_parallel_rank() == 0``, and the
    grid's model-parallel rank is the stage index inside the pipe group. A re-partitioned engine (V or
    mirrored placement) therefore clips with a different norm unless it replaces this rule.
    """
    case = Case(num_stages=2, tied=True, gradient_clipping=0.002)
    results = launch_case(case)
    assert_bit_exact(results, reference_run(case))
    # The clip is active, and the true global norm would have given other weights.
    unclipped = reference_run(replace(case, gradient_clipping=0.0))
    assert results[0].losses[1:] != unclipped.losses[1:]


def test_bf16_close_to_fp32_reference() -> None:
    case = Case(num_stages=2, bf16=True)
    results = launch_case(case)
    ref = reference_run(case)  # fp32 arithmetic throughout
    for result in results:
        assert result.losses == results[0].losses
        assert result.losses == pytest.approx(ref.losses, rel=2e-3)
    diffs = params_max_diff(merge_rank_params(results), ref.params)
    assert max(diffs.values()) < 5e-3, diffs


class _CountingEngine(PipelineEngine):
    """Overrides two handlers; only the one re-registered in ``_INSTRUCTION_MAP`` is dispatched to."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.harness_extras = {"ForwardPass": 0, "BackwardPass": 0}

    def _exec_forward_pass(self, buffer_id):
        self.harness_extras["ForwardPass"] += 1
        super()._exec_forward_pass(buffer_id)

    def _exec_backward_pass(self, buffer_id):  # not re-registered: the map still holds the base function
        self.harness_extras["BackwardPass"] += 1
        super()._exec_backward_pass(buffer_id)

    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.ForwardPass: _exec_forward_pass}


def test_engine_subclass_built_without_deepspeed_initialize() -> None:
    """A PipelineEngine subclass built by initialize_pipeline_engine trains like deepspeed.initialize's engine."""
    case = Case(num_stages=2)
    results = launch_case(case, engine_factory=partial(initialize_pipeline_engine, _CountingEngine))
    assert_bit_exact(results, reference_run(case))
    for result in results:
        counts = {key: result.extras[key] for key in ("ForwardPass", "BackwardPass")}
        assert counts == {"ForwardPass": case.steps * case.micro_batches, "BackwardPass": 0}
