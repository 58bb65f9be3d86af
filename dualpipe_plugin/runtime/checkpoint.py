"""Checkpoints of a standalone :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline`, keyed by stage.

Layout of a checkpoint directory::

    meta.json                   schedule, ranks, stages, step, user extras (written last: its presence
                                means the checkpoint is complete)
    stage_003.pt                the state_dict of pipeline stage 3 (model slices are portable: any
                                schedule with the same number of stages can load them)
    optim_rank_001.pt           rank 1's optimizer state (tied to this schedule and rank count)

DualPipe holds every stage twice (rank s chunk 0 and rank P-1-s chunk 1): only the copy on the route of
direction 0 writes the stage file, and both copies load it, so they start identical. Every file is
written to a temporary name and renamed, so a crash mid-save never leaves a half-written file that looks
complete. Loading checks the directory against this pipeline and says what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError

if TYPE_CHECKING:
    from dualpipe_plugin.runtime.pipeline import DualPipeline

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "latest_checkpoint"]

_FORMAT = 1


class CheckpointError(PipelineConfigError):
    """A checkpoint is missing, incomplete, corrupt, or was written by a different pipeline layout."""


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _writes_stage(pipe: "DualPipeline", chunk: int) -> bool:
    placement = pipe.placement
    return not placement.mirrored or placement.flow_of(chunk) == 0


def _barrier(pipe: "DualPipeline") -> None:
    # A collective on the pipeline's own group: checkpoints of several pipelines may be written at once.
    token = torch.zeros(1, device=pipe.executor.transport.device)
    pipe.executor.transport.all_reduce_sum(token)


def save_checkpoint(
    pipe: "DualPipeline", directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
    step: int = 0, extra: dict | None = None,
) -> Path:
    """Write this rank's part of a checkpoint (call on every pipeline rank; returns the directory)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    placement, rank = pipe.placement, pipe.rank
    for chunk, module in enumerate(pipe.chunks):
        if _writes_stage(pipe, chunk):
            stage = placement.stage(rank, chunk)
            _atomic_save({"format": _FORMAT, "stage": stage, "state": module.state_dict()}, path / f"stage_{stage:03d}.pt")
    if optimizer is not None:
        _atomic_save({"format": _FORMAT, "rank": rank, "state": optimizer.state_dict()}, path / f"optim_rank_{rank:03d}.pt")
    _barrier(pipe)
    if rank == 0:
        meta = {
            "format": _FORMAT, "schedule": pipe.executor.spec.name, "ranks": placement.num_ranks,
            "stages": placement.num_stages, "step": step, "optimizer": optimizer is not None, "extra": extra or {},
        }
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path / "meta.json")
    _barrier(pipe)
    return path


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no meta.json; a save may have been interrupted); "
            f"load an earlier checkpoint"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{meta_file} is corrupt ({error}); load an earlier checkpoint") from None
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{meta_file} has format {meta.get('format')!r}; this version reads format {_FORMAT}")
    return meta


def _load_file(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or garbled files
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({type(error).__name__}: {error})") from None


def load_checkpoint(
    pipe: "DualPipeline", directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load this rank's chunks (and optimizer state) from ``directory``; return the checkpoint's meta."""
    path = Path(directory)
    meta = _read_meta(path)
    placement = pipe.placement
    if meta["stages"] != placement.num_stages:
        raise CheckpointError(
            f"checkpoint {path} has {meta['stages']} pipeline stages ({meta['schedule']} on {meta['ranks']} ranks) "
            f"but this pipeline has {placement.num_stages} ({pipe.executor.spec.name} on {placement.num_ranks} "
            f"ranks); resume with the same stage count (model slices only match stage for stage)"
        )
    for chunk, module in enumerate(pipe.chunks):
        stage = placement.stage(pipe.rank, chunk)
        saved = _load_file(path / f"stage_{stage:03d}.pt")
        try:
            module.load_state_dict(saved["state"])
        except RuntimeError as error:
            raise CheckpointError(f"stage {stage} of {path} does not fit chunk {chunk} of this rank: {error}") from None
    if optimizer is not None:
        if not meta["optimizer"]:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state; load without optimizer=")
        if meta["ranks"] != placement.num_ranks or meta["schedule"] != pipe.executor.spec.name:
            raise CheckpointError(
                f"optimizer state in {path} was written by {meta['schedule']} on {meta['ranks']} ranks; this job runs "
                f"{pipe.executor.spec.name} on {placement.num_ranks}: optimizer state is per rank and does not move "
                f"between layouts (load the model only and start the optimizer fresh)"
            )
        optimizer.load_state_dict(_load_file(path / f"optim_rank_{pipe.rank:03d}.pt")["state"])
    return meta


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint under ``root`` with the highest step (directories ``step_*``), or None."""
    best, best_step = None, -1
    for candidate in Path(root).glob("step_*"):
        try:
            step = _read_meta(candidate)["step"]
        except CheckpointError:
            continue
        if step > best_step:
            best, best_step = candidate, step
    return best
