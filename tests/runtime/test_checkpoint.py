"""Standalone checkpoints: resume equals the uninterrupted run; bad checkpoints get clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dualpipe_plugin.launch import LocalRunError, run_local
from dualpipe_plugin.runtime.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from tests.runtime.harness import Case, batch, build_layers, loss_fn

pytestmark = pytest.mark.slow


def _train(rank: int, world: int, case: Case, steps: range, directory: str, save_at: int | None, resume: bool):
    """Train ``steps`` (optionally resuming from / saving into ``directory``); return losses and final params."""
    torch.manual_seed(123)  # a different init on purpose when resuming: the checkpoint must overwrite it
    layers = build_layers(case) if not resume else build_layers(Case(**{**case.__dict__, "seed": 99}))
    chunks = stage_modules(layers, case.schedule, world, rank)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn)
    params = [p for c in chunks for p in c.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    if resume:
        load_checkpoint(pipe, latest_checkpoint(directory), optimizer=optimizer)
    losses = []
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        x, y = batch(case, step)
        result = pipe.step(x, y, num_microbatches=case.microbatches)
        optimizer.step()
        losses.append(result.loss)
        if save_at is not None and step == save_at:
            save_checkpoint(pipe, f"{directory}/step_{step}", optimizer=optimizer, step=step)
    placement = pipe.placement
    state = {f"stage{placement.stage(rank, c)}": {k: v.clone() for k, v in m.state_dict().items()} for c, m in enumerate(chunks)}
    return {"losses": losses, "state": state}


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev", "zb1p"])
def test_resume_continues_bit_exactly(tmp_path, schedule):
    case = Case(schedule, 2, 4)
    whole = run_local(_train, 2, (case, range(4), str(tmp_path), 1, False))
    resumed = run_local(_train, 2, (case, range(2, 4), str(tmp_path), None, True))
    for full, tail in zip(whole, resumed):
        assert [float(v) for v in full["losses"][2:]] == [float(v) for v in tail["losses"]]
        for stage, tensors in full["state"].items():
            for name, value in tensors.items():
                assert torch.equal(value, tail["state"][stage][name]), (stage, name)
    if schedule == "dualpipe":  # two copies of each stage, one file each, both copies restored equal
        assert sorted(p.name for p in (tmp_path / "step_1").glob("data-*/stage_*.pt")) == ["stage_000.pt", "stage_001.pt"]
        assert torch.equal(resumed[0]["state"]["stage0"]["0.linear.weight"], resumed[1]["state"]["stage0"]["0.linear.weight"])


def _load_only(rank: int, world: int, schedule: str, directory: str, with_optimizer: bool):
    case = Case(schedule, world, 2 * world)
    pipe = DualPipeline(stage_modules(build_layers(case), schedule, world, rank), schedule, loss_fn=loss_fn)
    optimizer = torch.optim.SGD([p for c in pipe.chunks for p in c.parameters()], lr=0.1) if with_optimizer else None
    load_checkpoint(pipe, directory, optimizer=optimizer)


def test_mismatched_layout_and_corrupt_files_are_named(tmp_path):
    case = Case("dualpipev", 2, 4)
    run_local(_train, 2, (case, range(1), str(tmp_path), 0, False))
    ckpt = tmp_path / "step_0"
    # 2 ranks of dualpipev = 4 stages; 4 ranks of 1f1b = 4 stages: the model loads, the optimizer must not.
    with pytest.raises(LocalRunError, match="optimizer state .* was written by dualpipev on 2 ranks"):
        run_local(_load_only, 4, ("1f1b", str(ckpt), True))
    run_local(_load_only, 4, ("1f1b", str(ckpt), False))
    with pytest.raises(LocalRunError, match="has 4 pipeline stages .* but this pipeline has 2"):
        run_local(_load_only, 2, ("1f1b", str(ckpt), False))
    (stage_file,) = ckpt.glob("data-*/stage_002.pt")
    stage_file.write_bytes(b"not a checkpoint")
    with pytest.raises(LocalRunError, match="stage_002.pt has 16 bytes but meta.json records") as failed:
        run_local(_load_only, 2, ("dualpipev", str(ckpt), False))
    # stage 2 is rank 1's; rank 0's files are fine, but it loads nothing either
    assert "pipeline rank(s) [1] found checkpoint" in failed.value.failures[0].error
    assert "nothing was loaded on any rank" in failed.value.failures[0].error
    (ckpt / "meta.json").unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(None, ckpt)  # the directory check comes before anything touches the pipeline


def _fake_checkpoint(directory, step: int) -> None:
    """A one-stage checkpoint whose meta.json records its one file's size and sha256 (the data is opaque)."""
    payload = f"stage data of step {step}".encode()
    (directory / "data-0000000000000001").mkdir(parents=True)
    (directory / "data-0000000000000001" / "stage_000.pt").write_bytes(payload)
    meta = {"format": 2, "schedule": "1f1b", "ranks": 1, "stages": 1, "step": step, "optimizer": False, "extra": {},
            "data": "data-0000000000000001",
            "files": {"stage_000.pt": {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}}}
    (directory / "meta.json").write_text(json.dumps(meta))


def test_latest_checkpoint_picks_the_highest_complete_step(tmp_path):
    for step in (3, 10, 7):
        _fake_checkpoint(tmp_path / f"step_{step}", step)
    (tmp_path / "step_12").mkdir()  # incomplete: no meta.json
    assert latest_checkpoint(tmp_path).name == "step_10"
