"""A pipeline whose step failed mid-way refuses the next step (its links may still hold the failed step's
messages) with an error saying to rebuild it; a rebuilt pipeline on the same processes computes the
reference's loss and gradients, bit for bit.

The failure is real: rank 1's layer raises in its second forward of the step, after transfers of that
step went out; rank 1 stays alive (it caught its error), so rank 0 fails by its own timeout. Before, the
next step on the same pipeline consumed the failed step's leftovers and died in ``decode_header`` with an
``IndexError`` that blamed the live peer.
"""

from __future__ import annotations

import time

import pytest
import torch

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from tests.runtime.harness import Case, batch, build_layers, loss_fn, reference

pytestmark = pytest.mark.slow

CASE = Case("dualpipev", 2, 4)


def _outcome(call) -> tuple[str, float]:
    started = time.monotonic()
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}", time.monotonic() - started
    return "no error", time.monotonic() - started


def _fail_then_reuse_then_rebuild(rank: int, world: int, timeout_s: float) -> dict:
    chunks = stage_modules(build_layers(CASE), CASE.schedule, world, rank)
    forwards, broken = [0], [rank == 1]

    def user_bug(module, args):
        forwards[0] += 1
        if broken[0] and forwards[0] == 2:
            raise ValueError("a bug in the user's layer")

    chunks[0].register_forward_pre_hook(user_bug)
    x, y = batch(CASE, 0)
    pipe = DualPipeline(chunks, CASE.schedule, loss_fn=loss_fn, timeout_s=timeout_s, overlap=False)

    def step(pipeline):
        return pipeline.step(x if pipeline.needs_inputs() else None, y if pipeline.needs_labels() else None,
                             num_microbatches=CASE.microbatches)

    first, _ = _outcome(lambda: step(pipe))
    broken[0] = False
    second, second_s = _outcome(lambda: step(pipe))
    pipe.close()
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    rebuilt = DualPipeline(chunks, CASE.schedule, loss_fn=loss_fn, timeout_s=timeout_s, overlap=False)
    result = step(rebuilt)
    rebuilt.close()
    placement = rebuilt.placement
    grads = {f"stage{placement.stage(rank, c)}.{i}": p.grad.clone()
             for c, chunk in enumerate(chunks) for i, p in enumerate(chunk.parameters())}
    return {"first": first, "second": second, "second_s": second_s, "loss": result.loss, "grads": grads}


def test_a_pipeline_whose_step_failed_refuses_the_next_one_and_a_rebuilt_one_is_exact():
    results = run_local(_fail_then_reuse_then_rebuild, 2, (2.0,), timeout_s=120)
    assert results[1]["first"] == "ValueError: a bug in the user's layer"
    assert results[0]["first"].startswith("PipelineTimeoutError: pipeline rank 0: timed out after 2 s"), results[0]
    for rank, result in enumerate(results):
        second = result["second"]
        assert second.startswith(f"PipelineBrokenError: pipeline rank {rank}: refusing a step: the step of dualpipev "
                                 f"P=2 C=4 ("), second
        assert "failed earlier on this pipeline" in second and "Rebuild it: close() this pipeline" in second, second
        assert result["second_s"] < 1.0  # refused before anything is sent or awaited
    ref = reference(CASE)
    for result in results:
        assert torch.equal(result["loss"], ref["mean_loss"][0])
        for name, grad in result["grads"].items():
            assert torch.equal(grad, ref["grads"][0][name]), name
