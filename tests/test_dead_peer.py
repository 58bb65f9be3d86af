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


# -- the runtime's collectives and exchanges: a dead or stuck rank is named, never a raw backend error -----


def _in_last_backward(chunk: torch.nn.Module, microbatches: int, action) -> None:
    """Call ``action()`` in the backward of ``chunk``'s last micro-batch (a hook on that forward's output)."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == microbatches and torch.is_grad_enabled():
            output.register_hook(lambda grad: action())

    chunk.register_forward_hook(hook)


def _sigkill_after(seconds: float) -> None:
    time.sleep(seconds)  # the others are in the step's loss total by then: their own transfers are done
    os.kill(os.getpid(), signal.SIGKILL)


def _loss_total_fault(rank: int, world: int, fault: str, timeout_s: float) -> dict:
    """1F1B on ``world`` ranks; rank 0 (the last rank to finish a 1F1B step) is killed or stalls 12 s in its
    last backward, when every other rank waits in the step's loss total. Returns what ``step`` raised."""
    from dualpipe_plugin.runtime import DualPipeline, PipelineRuntimeError, stage_modules
    from tests.runtime.harness import Case, batch, build_layers, loss_fn

    case = Case("1f1b", world, 2 * world)
    chunks = stage_modules(build_layers(case), case.schedule, world, rank)
    if rank == 0:
        _in_last_backward(chunks[0], case.microbatches,
                          (lambda: _sigkill_after(1.0)) if fault == "kill" else (lambda: time.sleep(12.0)))
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, timeout_s=timeout_s, overlap=False)
    x, y = batch(case, 0)
    started = time.monotonic()
    try:
        pipe.step(x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
                  num_microbatches=case.microbatches)
    except PipelineRuntimeError as error:
        if fault == "kill":
            raise
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


def test_a_rank_killed_in_its_last_backward_is_named_by_the_loss_total():
    started = time.monotonic()
    with pytest.raises(LocalRunError) as caught:
        run_local(_loss_total_fault, 3, ("kill", 60.0), timeout_s=120)
    failures = {f.rank: f.error for f in caught.value.failures}
    assert failures[0] == "process exited with code -9"
    for rank in (1, 2):
        assert failures[rank].startswith(
            f"PipelinePeerError: pipeline rank {rank}: lost pipeline rank 0 (global rank 0) while receiving its part "
            f"in the step's loss total"), failures[rank]
        assert "that rank crashed or was killed" in failures[rank]
    assert time.monotonic() - started < 60  # named at once, far inside the 60 s pipeline timeout


def test_a_rank_stalled_in_its_last_backward_fails_the_loss_total_of_the_others_after_the_timeout():
    # pg_timeout_s: the process group's own limit, far above timeout_s, so only the pipeline's can end it in time.
    results = run_local(_loss_total_fault, 3, ("stall", 3.0), timeout_s=120, pg_timeout_s=120)
    for rank in (1, 2):
        error, seconds = results[rank]["error"], results[rank]["seconds"]
        assert error is not None and error.startswith(
            f"PipelineTimeoutError: pipeline rank {rank}: timed out after 3 s in the step's loss total: pipeline "
            f"rank 0 (global rank 0) did not join it"), error
        assert 2.5 < seconds < 10, seconds  # ~3 s, not the 12 s stall nor the group's 120 s
    # The stalled rank wakes to peers that gave up: an error naming them, not a hang nor a loss.
    assert results[0]["error"] is not None and "the step's loss total" in results[0]["error"], results[0]


def _mirror_exchange_fault(rank: int, world: int) -> None:
    """DualPipe P=2: rank 1 is SIGKILLed where it would exchange its mirrored gradients with rank 0."""
    from dualpipe_plugin.runtime import DualPipeline, stage_modules
    from tests.runtime.harness import Case, batch, build_layers, loss_fn

    case = Case("dualpipe", world, 2 * world)
    pipe = DualPipeline(stage_modules(build_layers(case), case.schedule, world, rank), case.schedule,
                        loss_fn=loss_fn, timeout_s=60, overlap=False)
    if rank == 1:
        pipe.executor.mirror_sync = lambda executor: _sigkill_after(1.0)
    pipe.step(*batch(case, 0), num_microbatches=case.microbatches)


def test_a_rank_killed_at_the_mirrored_gradient_exchange_is_named():
    with pytest.raises(LocalRunError) as caught:
        run_local(_mirror_exchange_fault, 2, timeout_s=120)
    failures = {f.rank: f.error for f in caught.value.failures}
    assert failures[1] == "process exited with code -9"
    assert failures[0].startswith("PipelinePeerError: pipeline rank 0: lost pipeline rank 1 (global rank 1) while "), \
        failures[0]
    assert "the mirrored float32 gradients" in failures[0], failures[0]


def _build_megatron_dualpipe(rank: int, world: int, stall_s: float, timeout_s: float) -> dict:
    """Build a two-rank DualPipe Megatron-Core GPT; rank 1's model takes ``stall_s`` longer to build."""
    from dualpipe_plugin.megatron import build_model_chunks, configure_model_config, enable_cpu_mode
    from dualpipe_plugin.reference.megatron_gpt import (
        Parallel, TinyGPT, destroy_parallel, init_parallel, model_provider, transformer_config,
    )

    with enable_cpu_mode():
        parallel, tiny = Parallel(pp=2), TinyGPT(num_layers=4)
        init_parallel(parallel, tiny.seed)
        try:
            config = configure_model_config(transformer_config(tiny, parallel), "dualpipe", timeout_s=timeout_s)
            provider = model_provider(tiny, config)
            if rank == 1:
                build = provider

                def provider(**where):  # a stuck rank: the first chunk comes ``stall_s`` late
                    if where["vp_stage"] == 0:
                        time.sleep(stall_s)
                    return build(**where)

            started = time.monotonic()
            try:
                build_model_chunks(provider, config)
            except Exception as error:
                return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - started}
            return {"error": None, "seconds": time.monotonic() - started}
        finally:
            destroy_parallel()


@pytest.mark.megatron
def test_a_stalled_rank_fails_the_initial_copy_of_dualpipes_mirrored_stages_after_the_timeout():
    pytest.importorskip("megatron.core")
    results = run_local(_build_megatron_dualpipe, 2, (10.0, 3.0), timeout_s=180, pg_timeout_s=120)
    error, seconds = results[0]["error"], results[0]["seconds"]
    assert error is not None and error.startswith(
        "PipelineTimeoutError: pipeline rank 0: timed out after 3 s receiving the initial float32 parameters of "
        "the mirrored stages from pipeline rank 1 (global rank 1)"), error
    assert seconds < 9, seconds  # not the 10 s stall
