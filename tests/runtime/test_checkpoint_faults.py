"""Checkpoints under real faults, on real gloo processes: a rank SIGKILLed in the middle of a save over an
existing checkpoint, a rank killed before the save's first collective, a save called on some ranks only.

The kill is a real SIGKILL of the rank's own process at a chosen instant of the save: after rank 1 has
written two of its three files, or on rank 0 just before it renames meta.json into place (the commit).
Either way the previous checkpoint must be what is left, and resuming from it must give the losses of
the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dualpipe_plugin.launch import LocalRunError, run_local
from dualpipe_plugin.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dualpipe_plugin.runtime.errors import PipelinePeerError, PipelineTimeoutError
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from tests.runtime.harness import Case, batch, build_layers, loss_fn

pytestmark = pytest.mark.slow

CASE = Case("dualpipev", 2, 4)
STEPS = 4
KILLED_SAVE = 2  # the step whose save is killed; step 1's save into the same directory is complete


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    """Make this process SIGKILL itself at ``point`` of the next save."""
    if point == "rank 1 after two of its three files":
        original, calls = torch.save, []

        def save(*args, **kwargs):
            original(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                _die()

        torch.save = save
    elif point == "rank 0 just before the commit":
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == "meta.json":
                _die()
            return original_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise AssertionError(point)


def _train(rank: int, world: int, directory: str, kill: str | None, resume: bool) -> dict:
    """Train to STEPS (or die in the save of KILLED_SAVE), saving every step into ONE directory."""
    torch.manual_seed(0)
    case = CASE if not resume else Case(**{**CASE.__dict__, "seed": 99})  # the checkpoint must overwrite it
    chunks = stage_modules(build_layers(case), case.schedule, world, rank)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, timeout_s=20, overlap=False)
    optimizer = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=1e-2)
    start = 0
    if resume:
        start = load_checkpoint(pipe, latest_checkpoint(directory), optimizer=optimizer)["step"] + 1
    losses = {}
    for step in range(start, STEPS):
        optimizer.zero_grad(set_to_none=True)
        losses[step] = float(pipe.step(*batch(case, step), num_microbatches=case.microbatches).loss)
        optimizer.step()
        if kill is not None and step == KILLED_SAVE and rank == int(kill.split()[1]):
            _arm(kill)
        save_checkpoint(pipe, Path(directory) / "step_last", optimizer=optimizer, step=step)
    state = {f"{c}.{k}": v.clone() for c, m in enumerate(chunks) for k, v in m.state_dict().items()}
    return {"start": start, "losses": losses, "state": state}


def _resume_then_run_whole(rank: int, world: int, directory: str) -> dict:
    """Resume from the newest checkpoint in ``directory``; then, in the same processes, the uninterrupted run."""
    resumed = _train(rank, world, directory, None, True)
    return {"resumed": resumed, "whole": _train(rank, world, str(Path(directory) / "whole"), None, False)}


@pytest.mark.parametrize("kill", ["rank 1 after two of its three files", "rank 0 just before the commit"])
def test_sigkill_during_a_save_over_a_checkpoint_leaves_the_previous_one(tmp_path, kill):
    with pytest.raises(LocalRunError) as failed:
        run_local(_train, 2, (str(tmp_path), kill, False))
    victim = int(kill.split()[1])
    by_rank = {f.rank: f.error for f in failed.value.failures}
    assert by_rank[victim] == "process exited with code -9"
    survivor = by_rank[1 - victim]  # it names the save's collective it was in, not a raw gloo error
    assert survivor.startswith(("PipelinePeerError", "PipelineTimeoutError")) and "checkpoint" in survivor, survivor

    assert latest_checkpoint(tmp_path) == tmp_path / "step_last"
    for result in run_local(_resume_then_run_whole, 2, (str(tmp_path),)):
        whole, tail = result["whole"], result["resumed"]
        assert tail["start"] == KILLED_SAVE  # step 1's checkpoint, complete, not a mix with step 2's files
        assert tail["losses"] == {s: whole["losses"][s] for s in range(KILLED_SAVE, STEPS)}
        assert all(torch.equal(value, tail["state"][name]) for name, value in whole["state"].items())


# -- collectives that cannot complete -------------------------------------------------------------------


def _save_on_some_ranks(rank: int, world: int, directory: str, callers: tuple[int, ...], timeout_s: float) -> dict:
    chunks = stage_modules(build_layers(Case("dualpipev", world, 2 * world)), "dualpipev", world, rank)
    pipe = DualPipeline(chunks, "dualpipev", loss_fn=loss_fn, timeout_s=timeout_s, overlap=False)
    pipe.executor.transport.barrier(what="the test's start", timeout_s=60)
    if rank not in callers:
        time.sleep(timeout_s + 3)  # alive and connected, but never joins the save
        return {"called": False}
    started = time.monotonic()
    try:
        save_checkpoint(pipe, directory, step=1)
    except PipelineTimeoutError as error:
        return {"called": True, "error": str(error), "seconds": time.monotonic() - started}
    return {"called": True, "error": None}


def test_save_checkpoint_on_some_ranks_only_times_out_on_every_caller(tmp_path):
    results = run_local(_save_on_some_ranks, 3, (str(tmp_path / "step_1"), (0, 1), 3.0), timeout_s=60)
    for rank, result in enumerate(results[:2]):
        assert result["error"] is not None, f"rank {rank} saved without rank 2"
        assert f"pipeline rank {rank}: timed out after 3 s in starting checkpoint" in result["error"]
        assert "every rank calls save_checkpoint" in result["error"]
        assert 2.5 < result["seconds"] < 15, result["seconds"]  # about timeout_s, not the group's 120 s
    assert latest_checkpoint(tmp_path) is None


def _killed_before_the_save(rank: int, world: int, directory: str) -> None:
    chunks = stage_modules(build_layers(CASE), CASE.schedule, world, rank)
    pipe = DualPipeline(chunks, CASE.schedule, loss_fn=loss_fn, timeout_s=20, overlap=False)
    save_checkpoint(pipe, directory, step=0)  # a complete one first: the ranks are connected
    if rank == 1:
        _die()
    save_checkpoint(pipe, directory, step=1)


def test_a_rank_killed_before_the_save_is_named_by_the_survivor(tmp_path):
    started = time.monotonic()
    with pytest.raises(LocalRunError) as failed:
        run_local(_killed_before_the_save, 2, (str(tmp_path / "step_0"),), timeout_s=60)
    survivor = next(f.error for f in failed.value.failures if f.rank == 0)
    assert survivor.startswith((PipelinePeerError.__name__, PipelineTimeoutError.__name__)), survivor
    assert "pipeline rank 0:" in survivor and "starting checkpoint" in survivor, survivor
    assert ("lost pipeline rank 1 (global rank 1)" in survivor
            or "pipeline rank 1 (global rank 1) did not join" in survivor), survivor
    assert time.monotonic() - started < 45
    assert latest_checkpoint(tmp_path).name == "step_0"
