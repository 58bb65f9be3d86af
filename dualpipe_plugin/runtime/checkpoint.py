"""Checkpoints of a standalone :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline`: the save and load
protocol across the pipeline ranks (atomic saves, nothing loaded before everything is checked).

The files and their checks are :mod:`dualpipe_plugin.runtime.checkpoint_format`'s; model slices are
portable (any schedule with the same number of stages can load them), optimizer files are tied to the
schedule and rank count that wrote them.

Saving (every pipeline rank calls :func:`save_checkpoint`; each collective waits at most the pipeline's
``timeout_s`` and names the rank that is missing or dead):

1. the ranks agree on a fresh token (an all-reduce of rank 0's random number): the folder ``data-<token>``;
2. each rank writes its files there (fsynced), hashing them as they are written, and a manifest;
3. an all-reduce of failure flags: every rank learns whether all of them wrote their part;
4. rank 0 merges the manifests, writes ``meta.json.tmp-<token>`` and renames it over ``meta.json``: the
   commit, one atomic rename. Then it removes every other ``data-*`` folder and ``meta.json.tmp-*`` file
   (the previous checkpoint's data, stale temporaries of killed saves);
5. an all-reduce of rank 0's outcome: every rank returns only once the checkpoint is committed.

A kill at any instant on any rank therefore leaves either the previous complete checkpoint (its
``meta.json`` still names its untouched data folder) or the new one; a save into a new directory that
dies before step 4 leaves no ``meta.json``, so the directory is not a checkpoint. Stale folders are
ignored by loading and removed by the next save into that directory.

Loading checks everything this rank needs before it touches the model or the optimizer: ``meta.json``
field by field, the layout against this pipeline, each file's size and sha256, that each stage's tensors
fit its chunk (names and shapes), and the optimizer's layout and parameter groups. The ranks then agree
(one all-reduce): if any rank found a problem, every rank raises and none loads anything.

DualPipe holds every stage twice (rank s chunk 0 and rank P-1-s chunk 1): only the copy on the route of
direction 0 writes the stage file, and both copies load it. The copies hold the same parameters and the
same buffers (see :mod:`dualpipe_plugin.runtime.mirror`), so nothing is lost.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dualpipe_plugin.runtime.checkpoint_format import (
    FORMAT,
    LOAD_EARLIER,
    CheckpointError,
    check_fits,
    check_optimizer_fits,
    data_folder,
    expected_files,
    fsync_directory,
    load_verified,
    manifest_file,
    optim_file,
    read_meta,
    stage_file,
    verify_file,
    write_json,
    write_tensor_file,
)

if TYPE_CHECKING:
    from dualpipe_plugin.runtime.pipeline import DualPipeline

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "latest_checkpoint"]


# -- saving ----------------------------------------------------------------------------------------------


def _writes_stage(pipe: "DualPipeline", chunk: int) -> bool:
    placement = pipe.placement
    return not placement.mirrored or placement.flow_of(chunk) == 0


def _failed_ranks(pipe: "DualPipeline", failed: bool, what: str) -> list[int]:
    """Sum one flag per rank over the pipeline (under its timeout); return the pipeline ranks that set theirs."""
    executor = pipe.executor
    flags = torch.zeros(executor.transport.size, dtype=torch.int64, device=executor.transport.device)
    flags[executor.rank] = int(failed)
    executor.all_reduce_sum(flags, what=what)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def _agree_on_token(pipe: "DualPipeline", path: Path) -> int:
    executor = pipe.executor
    token = torch.zeros(1, dtype=torch.int64, device=executor.transport.device)
    if executor.rank == 0:
        token[0] = secrets.randbits(62)
    executor.all_reduce_sum(token, what=f"starting checkpoint {path} (every rank calls save_checkpoint)")
    return int(token.item())


def _check_save_arguments(step: int, extra: dict | None) -> None:
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"save_checkpoint(step=...) must be an integer, got {step!r}; pass the training step")
    try:
        json.dumps(extra or {})
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"save_checkpoint(extra=...) must be JSON-serialisable ({error}); pass plain numbers, strings, lists, dicts"
        ) from None
    if extra is not None and not isinstance(extra, dict):
        raise CheckpointError(f"save_checkpoint(extra=...) must be a dict, got {type(extra).__name__}")


def _write_part(pipe: "DualPipeline", path: Path, data: Path, optimizer: torch.optim.Optimizer | None) -> None:
    """Step 2: this rank's stage files, optimizer file and manifest, in the data folder."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file, not a directory; choose a directory path")
    data.mkdir(parents=True, exist_ok=True)
    placement, rank = pipe.placement, pipe.rank
    manifest = {}
    for chunk, module in enumerate(pipe.chunks):
        if _writes_stage(pipe, chunk):
            stage = placement.stage(rank, chunk)
            manifest[stage_file(stage)] = write_tensor_file(
                {"format": FORMAT, "stage": stage, "state": module.state_dict()}, data / stage_file(stage))
    if optimizer is not None:
        manifest[optim_file(rank)] = write_tensor_file(
            {"format": FORMAT, "rank": rank, "state": optimizer.state_dict()}, data / optim_file(rank))
    write_json(manifest, data / manifest_file(rank))


def _commit(pipe: "DualPipeline", path: Path, data: Path, meta: dict) -> None:
    """Step 4 (rank 0): merge the manifests into meta.json, rename it into place, remove what it replaced."""
    files: dict[str, dict] = {}
    for rank in range(pipe.placement.num_ranks):
        manifest = data / manifest_file(rank)
        if not manifest.exists():
            raise CheckpointError(
                f"pipeline rank 0 cannot see {manifest}, which rank {rank} wrote: the checkpoint directory must be "
                f"on a filesystem every pipeline rank shares"
            )
        files.update(json.loads(manifest.read_text()))
    expected = expected_files(meta["stages"], meta["ranks"], meta["optimizer"])
    if set(files) != expected:
        raise CheckpointError(
            f"the ranks wrote {sorted(files)} into {data}, expected {sorted(expected)}; every pipeline rank must "
            f"save the same pipeline (same schedule and optimizer= on every rank)"
        )
    meta = {**meta, "data": data.name, "files": dict(sorted(files.items()))}
    token = data.name.removeprefix("data-")
    staging = path / f"meta.json.tmp-{token}"
    write_json(meta, staging)
    os.replace(staging, path / "meta.json")  # the commit
    fsync_directory(path)
    for entry in path.iterdir():
        if entry.name.startswith("data-") and entry.name != data.name:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("meta.json.tmp-"):
            entry.unlink(missing_ok=True)


def save_checkpoint(
    pipe: "DualPipeline", directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
    step: int = 0, extra: dict | None = None,
) -> Path:
    """Write a checkpoint of the whole pipeline into ``directory`` (call on every pipeline rank; returns it).

    Replaces a checkpoint already there only once the new one is complete (see the module docstring).
    """
    _check_save_arguments(step, extra)
    path = Path(directory)
    rank = pipe.rank
    data = path / data_folder(_agree_on_token(pipe, path))
    error: BaseException | None = None
    try:
        _write_part(pipe, path, data, optimizer)
    except Exception as caught:  # every rank must still reach the agreement below, or the others wait
        error = caught
    failed = _failed_ranks(pipe, error is not None, f"writing checkpoint {path} (every rank writes its files)")
    if error is not None:
        if isinstance(error, OSError):
            raise CheckpointError(
                f"pipeline rank {rank} could not write its part of checkpoint {path} ({error}); choose a writable "
                f"directory with free space (the previous checkpoint there, if any, is unchanged)"
            ) from error
        raise error
    if failed:
        raise CheckpointError(
            f"pipeline rank(s) {failed} could not write their part of checkpoint {path} (their errors say why); "
            f"nothing was committed: the previous checkpoint there, if any, is unchanged"
        )
    placement = pipe.placement
    meta = {
        "format": FORMAT, "schedule": pipe.executor.spec.name, "ranks": placement.num_ranks,
        "stages": placement.num_stages, "step": step, "optimizer": optimizer is not None, "extra": extra or {},
    }
    if rank == 0:
        try:
            _commit(pipe, path, data, meta)
        except Exception as caught:
            error = caught
    failed = _failed_ranks(pipe, error is not None, f"committing checkpoint {path} (rank 0 writes meta.json)")
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"pipeline rank 0 could not commit checkpoint {path} (its error says why); the previous checkpoint "
            f"there, if any, is unchanged"
        )
    return path


# -- reading ---------------------------------------------------------------------------------------------


def _check_layout(pipe: "DualPipeline", path: Path, meta: dict, optimizer: torch.optim.Optimizer | None) -> None:
    placement = pipe.placement
    if meta["stages"] != placement.num_stages:
        raise CheckpointError(
            f"checkpoint {path} has {meta['stages']} pipeline stages ({meta['schedule']} on {meta['ranks']} ranks) "
            f"but this pipeline has {placement.num_stages} ({pipe.executor.spec.name} on {placement.num_ranks} "
            f"ranks); resume with the same stage count (model slices only match stage for stage)"
        )
    if optimizer is None:
        return
    if not meta["optimizer"]:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state; load without optimizer=")
    if meta["ranks"] != placement.num_ranks or meta["schedule"] != pipe.executor.spec.name:
        raise CheckpointError(
            f"optimizer state in {path} was written by {meta['schedule']} on {meta['ranks']} ranks; this job runs "
            f"{pipe.executor.spec.name} on {placement.num_ranks}: optimizer state is per rank and does not move "
            f"between layouts (load the model only and start the optimizer fresh)"
        )


def _checked_states(
    pipe: "DualPipeline", path: Path, meta: dict, optimizer: torch.optim.Optimizer | None,
) -> tuple[list[dict], dict | None]:
    """Everything this rank will load, verified: one state per chunk and the optimizer's (or None)."""
    _check_layout(pipe, path, meta, optimizer)
    placement, rank = pipe.placement, pipe.rank
    states = []
    for chunk, module in enumerate(pipe.chunks):
        stage = placement.stage(rank, chunk)
        state = load_verified(path, meta, stage_file(stage), "stage", stage)
        check_fits(module, state, f"stage {stage} of {path} does not fit chunk {chunk} of pipeline rank {rank}")
        states.append(state)
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = load_verified(path, meta, optim_file(rank), "rank", rank)
        check_optimizer_fits(optimizer, optimizer_state, f"optimizer state {optim_file(rank)} of {path}")
    return states, optimizer_state


def load_checkpoint(
    pipe: "DualPipeline", directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load this rank's chunks (and optimizer state) from ``directory``; return the checkpoint's meta.

    Call on every pipeline rank. Nothing is loaded on any rank unless every rank's part checks out.
    """
    path = Path(directory)
    meta = read_meta(path)
    error: BaseException | None = None
    try:
        states, optimizer_state = _checked_states(pipe, path, meta, optimizer)
    except Exception as caught:  # every rank must still reach the agreement below, or the others wait
        error = caught
    failed = _failed_ranks(pipe, error is not None, f"checking checkpoint {path} on every rank before loading it")
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"pipeline rank(s) {failed} found checkpoint {path} unusable (their errors say why); nothing was loaded "
            f"on any rank: {LOAD_EARLIER}"
        )
    for module, state in zip(pipe.chunks, states):
        module.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    return meta


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The ``step_*`` directory under ``root`` with the highest step whose every file matches its checksum.

    Reads every file of the newest candidate (of older ones only while newer ones fail the check).
    """
    candidates = []
    for candidate in Path(root).glob("step_*"):
        try:
            candidates.append((read_meta(candidate)["step"], candidate.name, candidate))
        except (CheckpointError, OSError):
            continue
    for _, _, candidate in sorted(candidates, reverse=True):
        try:
            meta = read_meta(candidate)
            for name in meta["files"]:
                verify_file(candidate, meta, name)
        except (CheckpointError, OSError):
            continue
        return candidate
    return None
