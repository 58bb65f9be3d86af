"""State beyond the parameters under DualPipe's two copies of every stage: module buffers and seeded dropout.

- Buffers (BatchNorm's running statistics, ``num_batches_tracked``): both copies hold the same values at the
  end of every step, by the rule of ``runtime/mirror.py`` (floating: the mean of the two copies; integer:
  both copies' increments added), so a checkpoint that saves one copy and restores both loses nothing:
  evaluation after a resume equals the uninterrupted run's, bit for bit. Before, each copy kept the
  statistics of its own half of the micro-batches and a resume overwrote one of them.
- Dropout seeded per layer through :class:`~dualpipe_plugin.runtime.MicrobatchRNG`: every micro-batch gets
  its own mask, the one the single-process reference draws for it (before, a per-layer generator handed
  micro-batch C/2+m the mask of micro-batch m), under every schedule, with activation checkpointing too.

Losses, gradients and buffers are compared with the single-process reference bit for bit (fp32).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.runtime import MicrobatchRNG, MirroredGeneratorWarning, PipelineConfigError, set_microbatch
from dualpipe_plugin.runtime.checkpoint import load_checkpoint, save_checkpoint
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from tests.runtime.harness import Case, batch, build_layers, by_case, compare_to_reference, loss_fn, reference, run_cases
from tests.runtime.test_bad_input import OfflineTransport

CASES = [
    Case("dualpipe", 2, 4, dropout=0.5, steps=2, optimizer="sgd"),
    Case("dualpipe", 4, 8, dropout=0.5),
    Case("dualpipev", 2, 4, dropout=0.5, checkpoint=True),
    Case("zb1p", 2, 3, dropout=0.5),
    Case("dualpipe", 2, 4, batchnorm=True, steps=3, optimizer="sgd"),
    Case("dualpipe", 4, 8, batchnorm=True, dropout=0.5, steps=2, optimizer="adam"),
    Case("dualpipe", 2, 4, batchnorm=True, forward_only=True, steps=2),
]
JOBS = [("steps", case) for case in CASES]


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    results = run_local(run_cases, 4, args=(JOBS,), timeout_s=240)
    return {case.id: reports for (_, case), reports in zip(JOBS, by_case(results, JOBS))}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dropout_and_buffers_equal_the_reference(runs, case: Case) -> None:
    compare_to_reference(case, runs[case.id], reference(case), exact=True)


@pytest.mark.slow
def test_both_copies_of_a_stage_hold_the_same_buffers(runs) -> None:
    case = CASES[4]
    ref = reference(case)
    by_name: dict[str, list[torch.Tensor]] = {}
    for report in runs[case.id]:
        for name, value in report["buffers"][-1].items():
            by_name.setdefault(name, []).append(value)
    counted = [name for name, values in by_name.items() if values[0].dtype == torch.int64]
    assert counted  # num_batches_tracked: every micro-batch of every step counted, as in one process
    for name, values in by_name.items():
        assert all(torch.equal(v, values[0]) for v in values), name
    for name in counted:
        assert by_name[name][0].item() == case.steps * case.microbatches == ref["buffers"][-1][name].item()


# -- evaluation after a resume ------------------------------------------------------------------------------
BN = Case("dualpipe", 2, 4, batchnorm=True, dropout=0.25)
STEPS, SAVED = 3, 1


def _train_and_evaluate(rank: int, world: int, directory: str, resume: bool) -> dict:
    """Train BN to STEPS (saving after step SAVED), or resume from that checkpoint; then evaluate."""
    chunks = stage_modules(build_layers(BN), BN.schedule, world, rank)
    pipe = DualPipeline(chunks, BN.schedule, loss_fn=loss_fn, timeout_s=60, overlap=False)
    optimizer = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=0.1)
    start = load_checkpoint(pipe, directory, optimizer=optimizer)["step"] + 1 if resume else 0
    for step in range(start, STEPS):
        optimizer.zero_grad(set_to_none=True)
        pipe.step(*batch(BN, step), num_microbatches=BN.microbatches)
        optimizer.step()
        if step == SAVED and not resume:
            save_checkpoint(pipe, directory, optimizer=optimizer, step=step)
    for chunk in chunks:
        chunk.eval()
    result = pipe.step(*batch(BN, 99), num_microbatches=BN.microbatches, forward_only=True)
    pipe.close()
    return {"eval": result.loss, "losses": result.losses,
            "buffers": [[b.clone() for b in chunk.buffers()] for chunk in chunks]}


def _whole_then_resumed(rank: int, world: int, directory: str) -> dict:
    return {"whole": _train_and_evaluate(rank, world, directory, False),
            "resumed": _train_and_evaluate(rank, world, directory, True)}


@pytest.mark.slow
def test_evaluation_after_a_resume_equals_the_uninterrupted_run(tmp_path) -> None:
    results = run_local(_whole_then_resumed, 2, (str(tmp_path / "ckpt"),), timeout_s=120)
    for rank, result in enumerate(results):
        whole, resumed = result["whole"], result["resumed"]
        assert torch.equal(whole["eval"], resumed["eval"]), (rank, whole["eval"], resumed["eval"])
        assert whole["losses"].keys() == resumed["losses"].keys()
        assert all(torch.equal(whole["losses"][g], resumed["losses"][g]) for g in whole["losses"])
    # Rank r's chunk 0 and rank P-1-r's chunk 1 are the same stage: the same buffers.
    for key in ("whole", "resumed"):
        for mine, theirs in ((results[0][key]["buffers"][0], results[1][key]["buffers"][1]),
                             (results[0][key]["buffers"][1], results[1][key]["buffers"][0])):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


# -- seeded randomness, in process --------------------------------------------------------------------------


def test_microbatch_rng_draws_depend_on_seed_and_microbatch_only() -> None:
    def mask(seed: int, microbatch: int) -> torch.Tensor:
        rng = MicrobatchRNG(seed)
        set_microbatch(nn.Sequential(nn.Identity(), rng), microbatch)
        with rng.fork():
            from_fork = torch.rand(64)
        assert torch.equal(torch.rand(64, generator=rng.generator()), from_fork)
        return from_fork

    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    assert torch.equal(mask(1000, 3), mask(1000, 3))
    assert not torch.equal(mask(1000, 3), mask(1000, 4))
    assert not torch.equal(mask(1000, 3), mask(1001, 3))
    assert torch.equal(torch.random.get_rng_state(), before)  # fork() leaves the global RNG as it was
    for bad in (-1, 1.5, True, "7"):
        with pytest.raises(PipelineConfigError, match="MicrobatchRNG\\(seed=...\\) must be an integer >= 0"):
            MicrobatchRNG(bad)


class _OwnGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.linear(x) * (torch.rand(x.shape, generator=self.generator) > 0.5)


def test_a_private_generator_under_dualpipe_warns() -> None:
    case = Case("dualpipe", 2, 4)
    chunks = stage_modules(build_layers(case), case.schedule, 2, 0)
    chunks[1].append(_OwnGenerator())
    with pytest.warns(MirroredGeneratorWarning, match=r"chunk 1 module\(s\) 2 keep their own torch.Generator: "
                                                      r"dualpipe runs each stage as two copies"):
        DualPipeline(chunks, "dualpipe", loss_fn=loss_fn, transport=OfflineTransport(0, 2), overlap=False)
    seeded = stage_modules(build_layers(Case("dualpipe", 2, 4, dropout=0.5)), "dualpipe", 2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DualPipeline(seeded, "dualpipe", loss_fn=loss_fn, transport=OfflineTransport(0, 2), overlap=False)
