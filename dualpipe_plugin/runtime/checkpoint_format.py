"""The checkpoint format: file names, ``meta.json``'s fields, and writing and verifying checksummed files.

A checkpoint directory (written by :mod:`dualpipe_plugin.runtime.checkpoint`, which owns the save and load
protocol) holds::

    meta.json                   the commit record: format, schedule, ranks, stages, step, optimizer (bool),
                                extra (user values), data (the data folder's name) and files (every data
                                file's size and sha256)
    data-<token>/
        stage_003.pt            {"format", "stage": 3, "state": the state_dict of pipeline stage 3}
        optim_rank_001.pt       {"format", "rank": 1, "state": rank 1's optimizer state_dict}
        manifest_rank_001.json  sizes and checksums of the files rank 1 wrote (merged into meta.json)

This module knows what those files must look like and nothing about pipelines or ranks: it writes a file
while hashing it, reads ``meta.json`` field by field (a damaged file raises :class:`CheckpointError`,
never a ``KeyError``), checks a data file's size and sha256, and checks that a stage's tensors fit a
module and an optimizer's state fits an optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError

__all__ = [
    "FORMAT", "LOAD_EARLIER", "CheckpointError", "stage_file", "optim_file", "manifest_file", "expected_files",
    "data_folder", "write_tensor_file", "write_json", "fsync_directory", "read_meta", "verify_file",
    "load_verified", "check_fits", "check_optimizer_fits",
]

FORMAT = 2
"""The format this version writes and reads (1 had no checksums)."""
LOAD_EARLIER = "load an earlier checkpoint"
_DATA = re.compile(r"data-[0-9a-f]{16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(PipelineConfigError):
    """A checkpoint is missing, incomplete, corrupt, or was written by a different pipeline layout."""


# -- names -----------------------------------------------------------------------------------------------


def stage_file(stage: int) -> str:
    return f"stage_{stage:03d}.pt"


def optim_file(rank: int) -> str:
    return f"optim_rank_{rank:03d}.pt"


def manifest_file(rank: int) -> str:
    return f"manifest_rank_{rank:03d}.json"


def data_folder(token: int) -> str:
    """The name of the data folder of the save that agreed on ``token``."""
    return f"data-{token:016x}"


def expected_files(stages: int, ranks: int, optimizer: bool) -> set[str]:
    names = {stage_file(s) for s in range(stages)}
    return names | {optim_file(r) for r in range(ranks)} if optimizer else names


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


def write_tensor_file(obj: Any, path: Path) -> dict:
    """Write ``obj`` with torch.save and fsync it; return its size and sha256 for the manifest."""
    with open(path, "wb") as file:
        writer = _HashingWriter(file)
        torch.save(obj, writer)
        file.flush()
        os.fsync(file.fileno())
    return {"sha256": writer.digest.hexdigest(), "bytes": writer.size}


def write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as file:
        file.write(json.dumps(obj, indent=2))
        file.flush()
        os.fsync(file.fileno())


def fsync_directory(path: Path) -> None:
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
        f"{LOAD_EARLIER}"
    )


def read_meta(path: Path) -> dict:
    """meta.json of ``path``, validated field by field (never a KeyError or AttributeError)."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no meta.json; a save may have been interrupted); {LOAD_EARLIER}"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_file} is corrupt ({error}); {LOAD_EARLIER}") from None
    if not isinstance(meta, dict):
        raise _bad_meta(meta_file, f"the top level is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        if _is_int(meta.get("format")) and meta["format"] < FORMAT:
            raise CheckpointError(
                f"{meta_file} has format {meta['format']}, written by an earlier dualpipe_plugin without checksums; "
                f"this version reads format {FORMAT} only: load it with the version that wrote it and save it again"
            )
        raise _bad_meta(meta_file, f"field 'format' is {meta.get('format')!r}, this version reads {FORMAT}")
    for field, kind, valid in _FIELDS:
        if field not in meta:
            raise _bad_meta(meta_file, f"field {field!r} is missing")
        if not valid(meta[field]):
            raise _bad_meta(meta_file, f"field {field!r} must be {kind}, got {meta[field]!r}")
    expected = expected_files(meta["stages"], meta["ranks"], meta["optimizer"])
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


def verify_file(path: Path, meta: dict, name: str) -> Path:
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
        raise CheckpointError(
            f"checkpoint file {file} is missing; the checkpoint is incomplete: {LOAD_EARLIER}"
        ) from None
    if size != recorded["bytes"]:
        raise CheckpointError(
            f"checkpoint file {file} has {size} bytes but meta.json records {recorded['bytes']}: it is truncated or "
            f"was replaced; {LOAD_EARLIER}"
        )
    if digest.hexdigest() != recorded["sha256"]:
        raise CheckpointError(
            f"checkpoint file {file} does not match its sha256 in meta.json: it is corrupt or was swapped with "
            f"another file; {LOAD_EARLIER}"
        )
    return file


def load_verified(path: Path, meta: dict, name: str, key: str, value: int) -> dict:
    """Verify and load one data file; check that it says it holds ``key`` (stage or rank) ``value``."""
    file = verify_file(path, meta, name)
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for garbled files
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated ({type(error).__name__}: {error}); "
                              f"{LOAD_EARLIER}") from None
    if not (isinstance(saved, dict) and saved.get(key) == value and isinstance(saved.get("state"), dict)):
        raise CheckpointError(f"checkpoint file {file} does not hold the {key} {value} it is named for; {LOAD_EARLIER}")
    return saved["state"]


def check_fits(module: torch.nn.Module, state: dict, where: str) -> None:
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


def check_optimizer_fits(optimizer: torch.optim.Optimizer, state: dict, where: str) -> None:
    groups = state.get("param_groups")
    own = [len(group["params"]) for group in optimizer.param_groups]
    saved = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
             for g in groups] if isinstance(groups, list) else None
    if saved != own or not isinstance(state.get("state"), dict):
        raise CheckpointError(
            f"{where} has parameter groups of sizes {saved}, this optimizer {own}; build the optimizer over the same "
            f"parameters in the same groups, or load without optimizer= and start it fresh"
        )
