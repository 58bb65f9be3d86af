"""Damaged checkpoints are refused before anything is loaded; saves replace a checkpoint only when complete.

In one process: a one-rank dualpipev pipeline (two stages, both on rank 0) on a loopback transport writes
real checkpoints; the tests damage them on disk the way a disk, a copy or a killed job would (a flipped
byte in tensor data, two stage files swapped, a rewritten meta.json) and check that loading refuses with
:class:`CheckpointError` and leaves the model and optimizer exactly as they were. Killed multi-process
saves are in ``test_checkpoint_faults.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dualpipe_plugin.runtime.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from tests.runtime.harness import Case, batch, build_layers, loss_fn

CASE = Case("dualpipev", 1, 2)


class Loopback:
    """The transport of a pipeline of one rank (or one rank of a pipeline that must not communicate):
    every collective is the identity."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size, self.device = rank, size, torch.device("cpu")

    def start(self, ops):
        assert not ops, "a one-rank pipeline has nothing to send"
        return []

    def all_reduce_sum(self, tensor, *, what="", timeout_s=None):
        pass

    def barrier(self, *, what="", timeout_s=None):
        pass


def _pipeline(
    case: Case = CASE, rank: int = 0, seed: int = 0, chunks=None,
) -> tuple[DualPipeline, torch.optim.Optimizer]:
    if chunks is None:
        chunks = stage_modules(build_layers(Case(**{**case.__dict__, "seed": seed})), case.schedule, case.ranks, rank)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, transport=Loopback(rank, case.ranks), overlap=False)
    optimizer = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=1e-2)
    return pipe, optimizer


def _train_and_save(directory: Path, steps: int = 1) -> None:
    pipe, optimizer = _pipeline()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        pipe.step(*batch(CASE, step), num_microbatches=CASE.microbatches)
        optimizer.step()
        save_checkpoint(pipe, directory, optimizer=optimizer, step=step)


def _snapshot(pipe: DualPipeline, optimizer: torch.optim.Optimizer) -> tuple[list[dict], str]:
    model = [{k: v.clone() for k, v in chunk.state_dict().items()} for chunk in pipe.chunks]
    return model, repr(optimizer.state_dict())


def _assert_untouched(pipe: DualPipeline, optimizer: torch.optim.Optimizer, before) -> None:
    model, optim = _snapshot(pipe, optimizer)
    for chunk_before, chunk_now in zip(before[0], model):
        assert all(torch.equal(chunk_before[k], chunk_now[k]) for k in chunk_before)
    assert optim == before[1]


def _refused(directory: Path, match: str, **pipeline) -> None:
    """Loading ``directory`` raises CheckpointError matching ``match`` and changes nothing."""
    pipe, optimizer = _pipeline(seed=99, **pipeline)
    before = _snapshot(pipe, optimizer)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(pipe, directory, optimizer=optimizer)
    _assert_untouched(pipe, optimizer, before)


def _only(directory: Path, name: str) -> Path:
    (found,) = directory.glob(f"**/{name}")
    return found


@pytest.fixture
def saved(tmp_path) -> Path:
    directory = tmp_path / "step_0"
    _train_and_save(directory)
    return directory


def test_one_flipped_byte_in_tensor_data_is_refused(saved):
    file = _only(saved, "stage_001.pt")
    weight = torch.load(file, weights_only=True)["state"]["0.linear.weight"]
    raw = bytearray(file.read_bytes())
    at = raw.find(weight.numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x01  # a low mantissa bit: the file still loads, with one weight slightly wrong
    file.write_bytes(bytes(raw))
    _refused(saved, r"stage_001\.pt does not match its sha256")


def test_two_swapped_stage_files_are_refused(saved):
    first, second = _only(saved, "stage_000.pt"), _only(saved, "stage_001.pt")
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    _refused(saved, r"stage_000\.pt .*(sha256|truncated|bytes)")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda meta: [meta], r"meta\.json: the top level is a JSON list"),
        (lambda meta: {k: v for k, v in meta.items() if k != "stages"}, r"meta\.json: field 'stages' is missing"),
        (lambda meta: {k: v for k, v in meta.items() if k != "step"}, r"meta\.json: field 'step' is missing"),
        (lambda meta: {**meta, "stages": "2"}, r"meta\.json: field 'stages' must be a positive integer, got '2'"),
        (lambda meta: {**meta, "optimizer": "yes"}, r"meta\.json: field 'optimizer' must be true or false"),
        (lambda meta: {**meta, "format": None}, r"meta\.json: field 'format' is None"),
        (lambda meta: {**meta, "data": "../elsewhere"}, r"meta\.json: field 'data' must be the name of a data-"),
        (lambda meta: {**meta, "files": {}}, r"meta\.json: field 'files' does not list this layout's files"),
        (lambda meta: {**meta, "files": {k: {"bytes": 1} for k in meta["files"]}},
         r"field 'files' entry 'optim_rank_000"),
    ],
    ids=["list", "no-stages", "no-step", "stages-str", "optimizer-str", "format-null", "data-escapes", "files-empty",
         "files-no-sha"],
)
def test_damaged_meta_json_names_the_file_and_field(saved, damage, match):
    meta_file = saved / "meta.json"
    meta_file.write_text(json.dumps(damage(json.loads(meta_file.read_text()))))
    _refused(saved, match)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(None, saved)  # checked before anything touches the pipeline
    assert latest_checkpoint(saved.parent) is None


def test_optimizer_on_a_mismatched_layout_leaves_the_model_untouched(saved):
    # dualpipe on 2 ranks also has 2 stages (rank 0 holds both): the model would load, the optimizer must not,
    # and so nothing may.
    _refused(saved, "optimizer state .* was written by dualpipev on 1 ranks; this job runs dualpipe on 2",
             case=Case("dualpipe", 2, 4))


def test_a_stage_that_does_not_fit_leaves_every_chunk_untouched(saved):
    chunks = stage_modules(build_layers(Case(**{**CASE.__dict__, "seed": 99})), CASE.schedule, 1, 0)
    chunks[1] = nn.Sequential(*chunks[1], nn.Linear(CASE.dim, CASE.dim))  # chunk 0 fits, chunk 1 does not
    _refused(saved, r"stage 1 of .* does not fit chunk 1 .*unexpected|missing", chunks=chunks)


def test_latest_checkpoint_skips_a_newest_one_that_fails_its_checksums(tmp_path):
    _train_and_save(tmp_path / "step_0")
    _train_and_save(tmp_path / "step_1", steps=2)
    assert latest_checkpoint(tmp_path).name == "step_1"
    file = _only(tmp_path / "step_1", "optim_rank_000.pt")
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    file.write_bytes(bytes(raw))
    assert latest_checkpoint(tmp_path).name == "step_0"


def test_a_save_over_a_checkpoint_replaces_it_whole_and_cleans_stale_temporaries(tmp_path):
    directory = tmp_path / "step_x"
    _train_and_save(directory)
    stale = directory / "data-00000000deadbeef"  # what a save killed before its commit leaves behind
    stale.mkdir()
    (stale / "stage_000.pt").write_bytes(b"half a file")
    (directory / "meta.json.tmp-00000000deadbeef").write_text("{")
    pipe, optimizer = _pipeline(seed=99)
    assert load_checkpoint(pipe, directory, optimizer=optimizer)["step"] == 0  # stale folders are ignored
    _train_and_save(directory, steps=2)  # saves step 0 again, then step 1 over it
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["step"] == 1
    assert sorted(p.name for p in directory.iterdir()) == sorted(["meta.json", meta["data"]])


def test_a_checkpoint_of_the_previous_format_is_refused_with_the_way_out(saved):
    meta_file = saved / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "format": 1}))
    _refused(saved, r"has format 1, written by an earlier dualpipe_plugin without checksums; .* save it again")


def test_an_optimizer_with_other_parameter_groups_is_refused_before_the_model_loads(saved):
    pipe, _ = _pipeline(seed=99)
    first, second = ([p for p in chunk.parameters()] for chunk in pipe.chunks)
    optimizer = torch.optim.Adam([{"params": first}, {"params": second}], lr=1e-2)  # saved: one group
    before = _snapshot(pipe, optimizer)
    with pytest.raises(CheckpointError, match=r"optim_rank_000\.pt .* has parameter groups of sizes \[\d+\], this "
                                              r"optimizer \[\d+, \d+\]"):
        load_checkpoint(pipe, saved, optimizer=optimizer)
    _assert_untouched(pipe, optimizer, before)


@pytest.mark.parametrize(
    "step, extra, match",
    [(1.5, None, r"step=\.\.\.\) must be an integer, got 1\.5"), (True, None, "must be an integer, got True"),
     (1, {"lr": object()}, r"extra=\.\.\.\) must be JSON-serialisable")],
    ids=["float-step", "bool-step", "extra-object"],
)
def test_bad_save_arguments_are_refused_before_anything_is_written(tmp_path, step, extra, match):
    pipe, optimizer = _pipeline()
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(pipe, tmp_path / "step_1", optimizer=optimizer, step=step, extra=extra)
    assert not (tmp_path / "step_1").exists()


def test_unwritable_checkpoint_paths_are_named(tmp_path):
    pipe, optimizer = _pipeline()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CheckpointError, match=r"checkpoint path .*a_file is a file, not a directory"):
        save_checkpoint(pipe, tmp_path / "a_file", optimizer=optimizer)
    with pytest.raises(CheckpointError, match=r"pipeline rank 0 could not write its part of checkpoint .*a_file/step_1 "
                                              r"\(\[Errno 20\] Not a directory.*\); choose a writable directory"):
        save_checkpoint(pipe, tmp_path / "a_file" / "step_1", optimizer=optimizer)


def test_a_part_written_where_rank_0_cannot_see_it_is_not_committed(tmp_path):
    # Rank 0 of a two-rank pipeline alone (its peer's collectives are the identity): rank 1 "wrote" its files on
    # a disk rank 0 does not see, as on nodes without a shared filesystem.
    pipe, optimizer = _pipeline(Case("dualpipev", 2, 4))
    shared = r"cannot see .*manifest_rank_001\.json, which rank 1 wrote: the checkpoint directory must be on a filesystem"
    with pytest.raises(CheckpointError, match=shared):
        save_checkpoint(pipe, tmp_path / "step_1", optimizer=optimizer)
    assert latest_checkpoint(tmp_path) is None
