"""Checkpoints of a standalone :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline`: atomic, checksummed.

Layout of a checkpoint directory::

    meta.json                   the commit record: schedule, ranks, stages, step, user extras, the name of the
                                data folder and every file's size and sha256
    data-<token>/
        stage_003.pt            the state_dict of pipeline stage 3 (model slices are portable: any schedule
                                with the same number of stages can load them)
        optim_rank_001.pt       rank 1's optimizer state (tied to this schedule and rank count)
        manifest_rank_001.json  sizes and checksums of the files rank 1 wrote (merged into meta.json)

Saving (every pipeline rank calls :func:`save_checkpoint`; each collective waits at most the pipeline's
``timeout_s`` and names itself when a rank is missing or dead):

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
direction 0 writes the stage file, and both copies load it, so they start identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError

if TYPE_CHECKING:
    from dualpipe_plugin.runtime.pipeline import DualPipeline

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "latest_checkpoint"]

_FORMAT = 2
_DATA = re.compile(r"data-[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EARLIER = "load an earlier checkpoint"


class CheckpointError(PipelineConfigError):
    """A checkpoint is missing, incomplete, corrupt, or was written by a different pipeline layout."""


# -- names -----------------------------------------------------------------------------------------------


def _stage_file(stage: int) -> str:
    return f"stage_{stage:03d}.pt"


def _optim_file(rank: int) -> str:
    return f"optim_rank_{rank:03d}.pt"


def _manifest_file(rank: int) -> str:
    return f"manifest_rank_{rank:03d}.json"


def _expected_files(stages: int, ranks: int, optimizer: bool) -> set[str]:
    names = {_stage_file(s) for s in range(stages)}
    return names | {_optim_file(r) for r in range(ranks)} if optimizer else names


# -- writing ---------------------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only stream (torch.save writes sequentially to one) that hashes what passes through."""

    def __init__(self, file):
        self._file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def _write_tensor_file(obj: Any, path: Path) -> dict:
    """Write ``obj`` with torch.save and fsync it; return its size and sha256 for the manifest."""
    with open(path, "wb") as file:
        writer = _HashingWriter(file)
        torch.save(obj, writer)
        file.flush()
        os.fsync(file.fileno())
    return {"sha256": writer.digest.hexdigest(), "bytes": writer.size}


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as file:
        file.write(json.dumps(obj, indent=2))
        file.flush()
        os.fsync(file.fileno())


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _writes_stage(pipe: "DualPipeline", chunk: int) -> bool:
    placement = pipe.placement
    return not placement.mirrored or placement.flow_of(chunk) == 0


def _failed_ranks(pipe: "DualPipeline", failed: bool, what: str) -> list[int]:
    """All-reduce one flag per rank under the pipeline's timeout; return the pipeline ranks that set theirs."""
    transport = pipe.executor.transport
    flags = torch.zeros(transport.size, dtype=torch.int64, device=transport.device)
    flags[transport.rank] = int(failed)
    transport.all_reduce_sum(flags, what=what, timeout_s=pipe.executor.timeout_s)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def _agree_on_token(pipe: "DualPipeline", path: Path) -> int:
    transport = pipe.executor.transport
    token = torch.zeros(1, dtype=torch.int64, device=transport.device)
    if transport.rank == 0:
        token[0] = secrets.randbits(62)
    transport.all_reduce_sum(token, what=f"starting checkpoint {path} (every rank calls save_checkpoint)",
                             timeout_s=pipe.executor.timeout_s)
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
            manifest[_stage_file(stage)] = _write_tensor_file(
                {"format": _FORMAT, "stage": stage, "state": module.state_dict()}, data / _stage_file(stage))
    if optimizer is not None:
        manifest[_optim_file(rank)] = _write_tensor_file(
            {"format": _FORMAT, "rank": rank, "state": optimizer.state_dict()}, data / _optim_file(rank))
    _write_json(manifest, data / _manifest_file(rank))


def _commit(pipe: "DualPipeline", path: Path, data: Path, meta: dict) -> None:
    """Step 4 (rank 0): merge the manifests into meta.json, rename it into place, remove what it replaced."""
    files: dict[str, dict] = {}
    for rank in range(pipe.placement.num_ranks):
        manifest = data / _manifest_file(rank)
        if not manifest.exists():
            raise CheckpointError(
                f"pipeline rank 0 cannot see {manifest}, which rank {rank} wrote: the checkpoint directory must be "
                f"on a filesystem every pipeline rank shares"
            )
        files.update(json.loads(manifest.read_text()))
    expected = _expected_files(meta["stages"], meta["ranks"], meta["optimizer"])
    if set(files) != expected:
        raise CheckpointError(
            f"the ranks wrote {sorted(files)} into {data}, expected {sorted(expected)}; every pipeline rank must "
            f"save the same pipeline (same schedule and optimizer= on every rank)"
        )
    meta = {**meta, "data": data.name, "files": dict(sorted(files.items()))}
    token = data.name.removeprefix("data-")
    staging = path / f"meta.json.tmp-{token}"
    _write_json(meta, staging)
    os.replace(staging, path / "meta.json")  # the commit
    _fsync_directory(path)
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
    data = path / f"data-{_agree_on_token(pipe, path):016x}"
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
        "format": _FORMAT, "schedule": pipe.executor.spec.name, "ranks": placement.num_ranks,
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


def _is_int(value: Any, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


# meta.json's fields after "format": (name, what it must be, check), in the order they are checked.
_FIELDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("schedule", "a schedule name (string)", lambda v: isinstance(v, str) and bool(v)),
    ("ranks", "a positive integer", lambda v: _is_int(v, 1)),
    ("stages", "a positive integer", lambda v: _is_int(v, 1)),
    ("step", "an integer", _is_int),
    ("optimizer", "true or false", lambda v: isinstance(v, bool)),
    ("extra", "an object", lambda v: isinstance(v, dict)),
    ("data", "the name of a data-<16 hex digits> folder", lambda v: isinstance(v, str) and bool(_DATA.fullmatch(v))),
    ("files", "an object of file name -> {sha256, bytes}", lambda v: isinstance(v, dict)),
)


def _bad_meta(meta_file: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint metadata {meta_file}: {problem}; the file is damaged or was not written by save_checkpoint: "
        f"{_EARLIER}"
    )


def _read_meta(path: Path) -> dict:
    """meta.json of ``path``, validated field by field (never a KeyError or AttributeError)."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no meta.json; a save may have been interrupted); {_EARLIER}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_file} is corrupt ({error}); {_EARLIER}") from None
    if not isinstance(meta, dict):
        raise _bad_meta(meta_file, f"the top level is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != _FORMAT:
        if _is_int(meta.get("format")) and meta["format"] < _FORMAT:
            raise CheckpointError(
                f"{meta_file} has format {meta['format']}, written by an earlier dualpipe_plugin without checksums; "
                f"this version reads format {_FORMAT} only: load it with the version that wrote it and save it again"
            )
        raise _bad_meta(meta_file, f"field 'format' is {meta.get('format')!r}, this version reads {_FORMAT}")
    for field, kind, valid in _FIELDS:
        if field not in meta:
            raise _bad_meta(meta_file, f"field {field!r} is missing")
        if not valid(meta[field]):
            raise _bad_meta(meta_file, f"field {field!r} must be {kind}, got {meta[field]!r}")
    expected = _expected_files(meta["stages"], meta["ranks"], meta["optimizer"])
    if set(meta["files"]) != expected:
        missing, unknown = sorted(expected - set(meta["files"])), sorted(set(meta["files"]) - expected)
        raise _bad_meta(meta_file, f"field 'files' does not list this layout's files (missing {missing}, "
                                   f"unknown {unknown})")
    for name, entry in meta["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and _is_int(entry.get("bytes"), 0)):
            raise _bad_meta(meta_file, f"field 'files' entry {name!r} must be {{\"sha256\": 64 hex digits, \"bytes\": "
                                       f"an integer >= 0}}, got {entry!r}")
    return meta


def _verify_file(path: Path, meta: dict, name: str) -> Path:
    """The data file ``name`` after checking its size and sha256 against meta.json."""
    file = path / meta["data"] / name
    recorded = meta["files"][name]
    digest, size = hashlib.sha256(), 0
    try:
        with open(file, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
                size += len(block)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {file} is missing; the checkpoint is incomplete: {_EARLIER}") from None
    if size != recorded["bytes"]:
        raise CheckpointError(
            f"checkpoint file {file} has {size} bytes but meta.json records {recorded['bytes']}: it is truncated or "
            f"was replaced; {_EARLIER}"
        )
    if digest.hexdigest() != recorded["sha256"]:
        raise CheckpointError(
            f"checkpoint file {file} does not match its sha256 in meta.json: it is corrupt or was swapped with "
            f"another file; {_EARLIER}"
        )
    return file


def _load_verified(path: Path, meta: dict, name: str, key: str, value: int) -> dict:
    """Verify and load one data file; check that it says it holds ``key`` (stage or rank) ``value``."""
    file = _verify_file(path, meta, name)
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for garbled files
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated ({type(error).__name__}: {error}); "
                              f"{_EARLIER}") from None
    if not (isinstance(saved, dict) and saved.get(key) == value and isinstance(saved.get("state"), dict)):
        raise CheckpointError(f"checkpoint file {file} does not hold the {key} {value} it is named for; {_EARLIER}")
    return saved["state"]


def _check_fits(module: torch.nn.Module, state: dict, where: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [
        f"{name} saved {tuple(state[name].shape)} vs model {tuple(value.shape)}"
        for name, value in own.items()
        if name in state and isinstance(value, torch.Tensor) and isinstance(state[name], torch.Tensor)
        and state[name].shape != value.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{where}: missing {missing}, unexpected {unexpected}, shapes differ {shapes}; build the model with "
            f"the same layers per stage as the one that saved it"
        )


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, state: dict, where: str) -> None:
    groups = state.get("param_groups")
    own = [len(group["params"]) for group in optimizer.param_groups]
    saved = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
             for g in groups] if isinstance(groups, list) else None
    if saved != own or not isinstance(state.get("state"), dict):
        raise CheckpointError(
            f"{where} has parameter groups of sizes {saved}, this optimizer {own}; build the optimizer over the same "
            f"parameters in the same groups, or load without optimizer= and start it fresh"
        )


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
        state = _load_verified(path, meta, _stage_file(stage), "stage", stage)
        _check_fits(module, state, f"stage {stage} of {path} does not fit chunk {chunk} of pipeline rank {rank}")
        states.append(state)
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = _load_verified(path, meta, _optim_file(rank), "rank", rank)
        _check_optimizer_fits(optimizer, optimizer_state, f"optimizer state {_optim_file(rank)} of {path}")
    return states, optimizer_state


def load_checkpoint(
    pipe: "DualPipeline", directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load this rank's chunks (and optimizer state) from ``directory``; return the checkpoint's meta.

    Call on every pipeline rank. Nothing is loaded on any rank unless every rank's part checks out.
    """
    path = Path(directory)
    meta = _read_meta(path)
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
            f"on any rank: {_EARLIER}"
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
            candidates.append((_read_meta(candidate)["step"], candidate.name, candidate))
        except (CheckpointError, OSError):
            continue
    for _, _, candidate in sorted(candidates, reverse=True):
        try:
            meta = _read_meta(candidate)
            for name in meta["files"]:
                _verify_file(candidate, meta, name)
        except (CheckpointError, OSError):
            continue
        return candidate
    return None
