"""A rank SIGKILLed in the middle of a step, on the standalone, DeepSpeed and Megatron paths: every
survivor fails at once with an error naming the dead pipeline rank, and no process outlives the run."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from dualpipe_plugin.launch import LocalRunError, run_local

pytestmark = pytest.mark.slow


def _die_mid_step(rank: int, world: int, runner, args: tuple, victim: int, after_calls: int):
    """Run ``runner(rank, world, *args)``; on ``victim``, SIGKILL this process at its Nth module forward."""
    if rank == victim:
        calls = [0]

        def hook(module, inputs, output):
            calls[0] += 1
            if calls[0] == after_calls:
                os.kill(os.getpid(), signal.SIGKILL)

        torch.nn.modules.module.register_module_forward_hook(hook)
    return runner(rank, world, *args)


def _standalone(rank: int, world: int):
    from dualpipe_plugin.runtime import DualPipeline, stage_modules
    from tests.runtime.harness import Case, batch, build_layers, loss_fn

    case = Case("dualpipev", world, 8)
    pipe = DualPipeline(stage_modules(build_layers(case), case.schedule, world, rank), case.schedule,
                        loss_fn=loss_fn, timeout_s=60)
    for step in range(3):
        pipe.step(*batch(case, step), num_microbatches=case.microbatches)


def _deepspeed(rank: int, world: int):
    from tests.deepspeed.harness import Case, run_deepspeed_rank

    return run_deepspeed_rank(rank, world, Case(num_stages=2, micro_batches=4, plugin=True,
                                                pipeline={"schedule": "dualpipev", "timeout_s": 60}))


def _megatron(rank: int, world: int):
    from dualpipe_plugin.reference.megatron_gpt import Parallel
    from tests.megatron.harness import RunSpec, run_megatron

    return run_megatron(rank, world, RunSpec(parallel=Parallel(pp=2), schedule="dualpipev", iterations=2))


@pytest.mark.parametrize("engine", ["standalone", "deepspeed", "megatron"])
def test_survivors_name_the_dead_peer(engine):
    if engine != "standalone":
        pytest.importorskip("deepspeed" if engine == "deepspeed" else "megatron.core")
    runner = {"standalone": _standalone, "deepspeed": _deepspeed, "megatron": _megatron}[engine]
    started = time.monotonic()
    with pytest.raises(LocalRunError) as caught:
        run_local(_die_mid_step, 2, (runner, (), 1, 25), timeout_s=240,
                  init_process_group=engine != "deepspeed")  # DeepSpeed initialises its own
    failures = {f.rank: f for f in caught.value.failures}
    assert "exited with code -9" in failures[1].error  # the victim, killed by SIGKILL
    survivor = failures[0].error
    assert "PipelinePeerError" in survivor or "PipelineTimeoutError" in survivor, survivor
    assert "pipeline rank 0" in survivor and "pipeline rank 1" in survivor, survivor
    assert time.monotonic() - started < 120  # well inside the 60 s pipeline timeout plus start-up
