"""With detect_nonfinite=True a NaN loss in any micro-batch raises NonFiniteLossError on every rank."""

from __future__ import annotations

import pytest

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.runtime import DualPipeline, NonFiniteLossError, stage_modules
from tests.runtime.harness import Case, batch, build_layers, loss_fn

pytestmark = pytest.mark.slow


def _step(rank: int, world: int, poison: bool, detect: bool) -> str:
    case = Case("dualpipev", world, 4)
    pipe = DualPipeline(stage_modules(build_layers(case), case.schedule, world, rank), case.schedule,
                        loss_fn=loss_fn, detect_nonfinite=detect, timeout_s=30)
    x, y = batch(case, 0)
    if poison:
        y[2 * case.batch_per_microbatch] = float("nan")  # the first sample of micro-batch 2
    try:
        result = pipe.step(x, y, num_microbatches=case.microbatches)
    except NonFiniteLossError as error:
        return f"raised: {error}"
    return f"loss {float(result.loss)}"


def test_nan_is_reported_on_every_rank():
    outcomes = run_local(_step, 2, (True, True))
    assert all(o.startswith("raised: pipeline rank") for o in outcomes), outcomes
    assert all("1 micro-batch loss(es) of this step are NaN or infinite" in o for o in outcomes)
    assert "on this rank: micro-batches [2]" in outcomes[0]  # dualpipev's losses live on rank 0
    assert "skip the optimizer step" in outcomes[1]


def test_off_by_default_and_silent_when_finite():
    assert run_local(_step, 2, (True, False))[0] == "loss nan"
    assert all(o.startswith("loss ") and o != "loss nan" for o in run_local(_step, 2, (False, True)))
