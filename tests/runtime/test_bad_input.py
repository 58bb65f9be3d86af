"""Bad input: a clear error on every rank that sees the mistake; the others end with a timeout or a lost-peer
error naming the rank they waited for, never a hang.

Mistakes every rank makes alike (wrong chunk count, a rejected micro-batch count, an indivisible batch) are
raised before any transfer, so they are checked in process for each rank, on a transport that fails the
test if it is asked to communicate. Mistakes only some ranks see run on spawned gloo ranks with a short
``timeout_s``, and ``run_local`` itself must come back well within its own deadline.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from dualpipe_plugin.launch import LocalRunError, run_local
from dualpipe_plugin.runtime.errors import (
    PipelineConfigError,
    PipelinePeerError,
    PipelineRuntimeError,
    PipelineTimeoutError,
)
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from dualpipe_plugin.schedules import ScheduleConfigError
from tests.runtime.harness import (
    Case, ReturnsDict, batch, build_layers, die_on_forward, loss_fn, run_bad_input,
)


class OfflineTransport:
    """A :class:`~dualpipe_plugin.runtime.transport.Transport` for one rank that must not communicate."""

    def __init__(self, rank: int, size: int, device: str = "cpu"):
        self.rank, self.size, self.device = rank, size, torch.device(device)

    def start(self, ops):
        if ops:
            raise AssertionError(f"unexpected communication before the error: {[op.what for op in ops]}")
        return []

    def all_reduce_sum(self, tensor, **_):
        raise AssertionError("unexpected all-reduce before the error")


def _pipeline(case: Case, rank: int, chunks=None, **options) -> DualPipeline:
    if chunks is None:
        chunks = stage_modules(build_layers(case), case.schedule, case.ranks, rank)
    return DualPipeline(chunks, case.schedule, loss_fn=loss_fn, transport=OfflineTransport(rank, case.ranks),
                        overlap=False, **options)


def test_error_classes() -> None:
    assert issubclass(PipelineConfigError, ValueError)
    assert issubclass(PipelineTimeoutError, PipelineRuntimeError) and issubclass(PipelineTimeoutError, TimeoutError)
    assert issubclass(PipelinePeerError, PipelineRuntimeError) and not issubclass(PipelinePeerError, ValueError)


# -- in process: mistakes every rank makes alike --------------------------------------------------------
@pytest.mark.parametrize(
    "schedule, ranks, count, needles",
    [
        ("dualpipev", 2, 1, ["'dualpipev' runs 2 chunk(s) per rank, got 1", "[stage r, stage 2P-1-r]"]),
        ("dualpipev", 4, 3, ["runs 2 chunk(s) per rank, got 3"]),
        ("dualpipe", 4, 1, ["'dualpipe' runs 2 chunk(s) per rank, got 1", "[stage r, stage P-1-r] for dualpipe"]),
        ("1f1b", 2, 2, ["'1f1b' runs 1 chunk(s) per rank, got 2", "pass the one stage this rank holds"]),
        ("zb1p", 4, 0, ["'zb1p' runs 1 chunk(s) per rank, got 0"]),
    ],
)
def test_wrong_number_of_chunks(schedule: str, ranks: int, count: int, needles: list[str]) -> None:
    for rank in range(ranks):
        chunks = [nn.Sequential(nn.Linear(4, 4)) for _ in range(count)]
        with pytest.raises(PipelineConfigError) as info:
            DualPipeline(chunks, schedule, loss_fn=loss_fn, transport=OfflineTransport(rank, ranks), overlap=False)
        for needle in needles:
            assert needle in str(info.value), str(info.value)


def test_chunk_on_another_device_than_the_transport() -> None:
    # No GPU needed: a CUDA transport is only a device object here; and meta parameters on a CPU transport.
    with pytest.raises(PipelineConfigError) as info:
        DualPipeline([nn.Linear(4, 4)], "1f1b", loss_fn=loss_fn, transport=OfflineTransport(0, 2, device="cuda"),
                     overlap=False)
    assert "chunk 0 parameter 'weight' is on cpu but this pipeline communicates on cuda" in str(info.value)
    assert ".to('cuda')" in str(info.value)
    chunks = [nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)).to("meta")]
    with pytest.raises(PipelineConfigError, match=r"chunk 1 parameter '0.weight' is on meta but this pipeline communicates on cpu"):
        DualPipeline(chunks, "dualpipev", loss_fn=loss_fn, transport=OfflineTransport(0, 2), overlap=False)


@pytest.mark.parametrize(
    "schedule, ranks, microbatches, needles",
    [
        ("dualpipe", 4, 6, ["at least 2 x ranks = 8 micro-batches", "microbatches=6"]),
        ("dualpipe", 2, 5, ["must be even", "microbatches=5"]),
        ("dualpipev", 2, 3, ["dualpipev needs at least 2 x ranks = 4", "microbatches=3"]),
        ("1f1b", 2, 0, ["1f1b needs at least 1 micro-batch"]),
    ],
)
def test_microbatch_count_the_schedule_rejects(schedule: str, ranks: int, microbatches: int, needles) -> None:
    case = Case(schedule, ranks, 2 * ranks)
    x, y = batch(case, 0)
    rows = 60  # divides by every count above, so the schedule, not the batch split, is what refuses
    x, y = x[:1].expand(rows, *x.shape[1:]), y[:1].expand(rows, *y.shape[1:])
    for rank in range(ranks):
        pipe = _pipeline(case, rank)
        with pytest.raises(ScheduleConfigError) as info:
            pipe.step(x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
                      num_microbatches=microbatches)
        for needle in needles:
            assert needle in str(info.value), str(info.value)
        pipe.close()


def test_batch_that_does_not_divide_into_microbatches() -> None:
    case = Case("dualpipev", 2, 4)
    x, y = batch(case, 0)  # 12 rows
    pipe = _pipeline(case, 0)  # rank 0 holds the first and the last stage: inputs and labels
    with pytest.raises(PipelineConfigError, match="input batch of 12 does not divide into 5 equal micro-batches"):
        pipe.step(x, y, num_microbatches=5)
    with pytest.raises(PipelineConfigError, match="label batch of 13 does not divide into 4 equal micro-batches; use a batch size that is a multiple"):
        pipe.step(x, torch.cat([y, y[:1]]), num_microbatches=4)
    # A tuple of inputs is checked tensor by tensor.
    with pytest.raises(PipelineConfigError, match="input batch of 11 does not divide into 4"):
        pipe.step((x, x[:11]), y, num_microbatches=4)


def test_missing_labels_inputs_or_loss() -> None:
    case = Case("1f1b", 2, 2)
    x, y = batch(case, 0)
    last = _pipeline(case, 1)
    assert last.needs_labels() and not last.needs_inputs()
    with pytest.raises(PipelineConfigError, match="rank 1 holds a last stage and needs the labels to compute the loss; got None"):
        last.step(None, None, num_microbatches=2)
    first = _pipeline(case, 0)
    with pytest.raises(PipelineConfigError, match="rank 0 holds a first stage and needs the inputs; got None"):
        first.step(None, None, num_microbatches=2)
    no_loss = DualPipeline(stage_modules(build_layers(case), "1f1b", 2, 1), "1f1b", transport=OfflineTransport(1, 2),
                           overlap=False)
    with pytest.raises(PipelineConfigError, match="training needs a loss_fn"):
        no_loss.step(None, y, num_microbatches=2)
    with pytest.raises(PipelineConfigError, match="loss_reduction must be 'mean' or 'sum', got 'avg'"):
        last.step(None, y, num_microbatches=2, loss_reduction="avg")


def test_no_process_group_and_no_transport() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(PipelineConfigError, match="torch.distributed is not initialised; call torch.distributed.init_process_group"):
        DualPipeline([nn.Linear(4, 4)], "1f1b", loss_fn=loss_fn)


# -- in process, one rank holding both stages: odd stage outputs, losses and batches ----------------------
# dualpipev on one rank: stage 0 hands its output to stage 1 locally (no transfer), so everything up to the
# loss runs against the offline transport.
ONE_RANK = Case("dualpipev", 1, 2)


def _one_rank(chunks=None, loss=loss_fn) -> DualPipeline:
    chunks = chunks if chunks is not None else stage_modules(build_layers(ONE_RANK), "dualpipev", 1, 0)
    return DualPipeline(chunks, "dualpipev", loss_fn=loss, transport=OfflineTransport(0, 1), overlap=False)


def _one_step(pipe: DualPipeline, x=None, y=None, **options):
    if x is None:
        x, y = batch(ONE_RANK, 0)
    return pipe.step(x, y, num_microbatches=ONE_RANK.microbatches, reduce_loss=False, **options)


def test_a_dict_between_stages_is_refused_naming_the_fix() -> None:
    chunks = stage_modules(build_layers(ONE_RANK), "dualpipev", 1, 0)
    chunks[0] = ReturnsDict(chunks[0])
    with pytest.raises(PipelineConfigError) as info:
        _one_step(_one_rank(chunks))
    assert str(info.value).startswith("pipeline rank 0: chunk 0 returned a dict (keys ['hidden']) for micro-batch 0; "
                                      "between pipeline stages a chunk must return a tensor or a tuple of tensors")
    assert "return tuple(output.values()) in a fixed order" in str(info.value)


def test_a_stage_output_that_is_not_a_tensor_is_refused() -> None:
    class Forgets(nn.Module):
        def forward(self, x):
            x * 2  # noqa: B018 -- the mistake under test: no return

    chunks = stage_modules(build_layers(ONE_RANK), "dualpipev", 1, 0)
    with pytest.raises(PipelineConfigError, match=r"chunk 0 returned None as output 0 for micro-batch 0 \(did its "
                                                  r"forward forget to return\?\)"):
        _one_step(_one_rank([Forgets(), chunks[1]]))


def test_a_dict_from_the_last_stage_goes_to_the_loss_function() -> None:
    chunks = stage_modules(build_layers(ONE_RANK), "dualpipev", 1, 0)
    plain = _one_step(_one_rank(chunks), return_outputs=True)
    chunks[1] = ReturnsDict(chunks[1])
    mapped = _one_step(_one_rank(chunks, loss=lambda out, target: loss_fn(out["hidden"], target)), return_outputs=True)
    assert all(torch.equal(mapped.losses[g], plain.losses[g]) for g in plain.losses)
    assert torch.equal(mapped.outputs[1][0]["hidden"], plain.outputs[1][0])
    assert not mapped.outputs[1][0]["hidden"].requires_grad  # detached, like the tuple outputs


@pytest.mark.parametrize(
    "loss, needles",
    [
        (lambda out, target: loss_fn(out, target).item(),
         ["the loss of micro-batch 0 is a float (", "not a tensor", "not loss.item() or float(loss)"]),
        (lambda out, target: (out - target) ** 2,
         ["the loss of micro-batch 0 is a tensor of shape [3, 4, 16] (192 values)", "add .mean() (or .sum())"]),
        (lambda out, target: {"loss": loss_fn(out, target)},
         ["the loss of micro-batch 0 is a dict ({'loss': tensor("]),
    ],
    ids=["float", "unreduced", "dict"],
)
def test_a_loss_that_is_not_one_value_is_refused_naming_the_fix(loss, needles: list[str]) -> None:
    for forward_only in (False, True):
        with pytest.raises(PipelineConfigError) as info:
            _one_step(_one_rank(loss=loss), forward_only=forward_only)
        assert str(info.value).startswith("pipeline rank 0: the loss of micro-batch 0 is ")
        for needle in needles:
            assert needle in str(info.value), str(info.value)


def test_an_empty_or_shapeless_batch_is_refused_at_the_door() -> None:
    x, y = batch(ONE_RANK, 0)
    with pytest.raises(PipelineConfigError, match=r"^input batch has 0 rows: each of the 2 micro-batches would "
                                                  r"be empty \(and its loss NaN\); pass a batch with a multiple "
                                                  r"of 2 rows"):
        _one_step(_one_rank(), x[:0], y[:0])
    with pytest.raises(PipelineConfigError, match=r"^label batch has 0 rows"):
        _one_step(_one_rank(), x, y[:0])
    with pytest.raises(PipelineConfigError, match=r"^input batch has a 0-dimensional tensor \(no batch dimension\)"):
        _one_step(_one_rank(), torch.tensor(1.0), y)
    with pytest.raises(PipelineConfigError, match=r"^the inputs must be a tensor or a tuple of tensors, got list"):
        _one_step(_one_rank(), [x], y)


# -- spawned: mistakes only some ranks see ---------------------------------------------------------------
_DEADLINE_S = 60.0
_WAIT_ERRORS = ("PipelinePeerError", "PipelineTimeoutError")


def _failures(fn, world_size: int, args: tuple) -> dict[int, tuple[str, str]]:
    """Run and expect LocalRunError; return rank -> (exception class name, message + traceback)."""
    start = time.monotonic()
    with pytest.raises(LocalRunError) as info:
        run_local(fn, world_size, args=args, timeout_s=_DEADLINE_S)
    elapsed = time.monotonic() - start
    assert elapsed < _DEADLINE_S - 5, f"run_local took {elapsed:.0f} s: a rank hung until the deadline"
    failures = {f.rank: (f.error.partition(":")[0], f.error + "\n" + f.traceback) for f in info.value.failures}
    assert sorted(failures) == list(range(world_size)), f"every rank must fail: {info.value}"
    return failures


def _assert_waiter(text_and_class: tuple[str, str], rank: int, peer: int, classes=_WAIT_ERRORS) -> None:
    name, text = text_and_class
    assert name in classes, f"rank {rank} ended with {name}, not one of {classes}:\n{text}"
    assert f"pipeline rank {rank}:" in text and f"pipeline rank {peer}" in text, text
    assert "micro-batch" in text, text  # the transfer it waited for
    assert f"pipeline rank {rank}, step" in text or f"pipeline rank {rank}, end of the step" in text, text  # the op


@pytest.mark.slow
@pytest.mark.parametrize("linger", [False, True], ids=["peer-exits", "peer-lingers"])
def test_labels_missing_on_the_loss_rank(linger: bool) -> None:
    # linger: the failing rank stays alive with its connections open, so rank 0 must time out by itself.
    failures = _failures(run_bad_input, 2, ("labels_missing", 2.0, 6.0 if linger else 0.0))
    assert failures[1][0] == "PipelineConfigError"
    assert "rank 1 holds a last stage and needs the labels" in failures[1][1]
    _assert_waiter(failures[0], 0, 1, ("PipelineTimeoutError",) if linger else _WAIT_ERRORS)
    if linger:
        assert "timed out after 2 s receiving gradient of micro-batch 0" in failures[0][1]


@pytest.mark.slow
def test_indivisible_labels_on_one_rank() -> None:
    failures = _failures(run_bad_input, 2, ("indivisible", 5.0))
    assert failures[1][0] == "PipelineConfigError"
    assert "label batch of 13 does not divide into 4 equal micro-batches" in failures[1][1]
    _assert_waiter(failures[0], 0, 1)


@pytest.mark.slow
def test_wrong_number_of_chunks_on_one_rank() -> None:
    failures = _failures(run_bad_input, 2, ("wrong_chunks", 5.0))
    assert failures[1][0] == "PipelineConfigError"
    assert "runs 2 chunk(s) per rank, got 1" in failures[1][1]
    _assert_waiter(failures[0], 0, 1)


@pytest.mark.slow
def test_mismatched_shapes_between_ranks() -> None:
    # Rank 0 sends dim 16, rank 1's stages were built for dim 8: rank 1's first forward fails.
    failures = _failures(run_bad_input, 2, ("shapes", 5.0))
    assert failures[1][0] == "RuntimeError"
    assert "mat1 and mat2 shapes cannot be multiplied" in failures[1][1]
    assert "pipeline rank 1, step 0 (F0:0) of dualpipev P=2 C=4" in failures[1][1]  # the note names the op
    _assert_waiter(failures[0], 0, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, victim, survivors",
    [(Case("dualpipev", 2, 4), 1, (0,)), (Case("1f1b", 3, 6), 1, (0, 2))],
    ids=lambda v: v.id if isinstance(v, Case) else str(v),
)
def test_peer_that_dies_mid_step(case: Case, victim: int, survivors: tuple[int, ...]) -> None:
    case = Case(case.schedule, case.ranks, case.microbatches, options={"timeout_s": 3.0})
    failures = _failures(die_on_forward, case.ranks, (case, victim, 2))  # dies in its third forward
    assert failures[victim][0] == "process exited with code 1"
    for rank in survivors:
        _assert_waiter(failures[rank], rank, victim)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario, needle",
    [
        ("dict_between_stages", "pipeline rank 0: chunk 0 returned a dict (keys ['hidden']) for micro-batch 0"),
        ("float_loss", "pipeline rank 0: the loss of micro-batch 0 is a float ("),
        ("vector_loss", "pipeline rank 0: the loss of micro-batch 0 is a tensor of shape [3, 4, 16]"),
        ("empty_batch", "input batch has 0 rows: each of the 4 micro-batches would be empty"),
    ],
)
def test_an_odd_output_loss_or_batch_fails_every_rank_in_time(scenario: str, needle: str) -> None:
    failures = _failures(run_bad_input, 2, (scenario, 5.0))
    assert failures[0][0] == "PipelineConfigError" and needle in failures[0][1], failures[0]
    _assert_waiter(failures[1], 1, 0)  # rank 1 names the rank it waited for, within the timeout
