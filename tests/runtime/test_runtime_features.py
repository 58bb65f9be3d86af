"""Runtime features on gloo/CPU: eval mode, shapes changing between steps, the B/W split under activation
checkpointing, dualpipe's mirrored copies after optimizer steps, and proof that the W split defers.

Every comparison is bit-exact (``torch.equal``), for the reasons given in test_equivalence.py. All jobs
run in ONE spawned 4-process job (see harness.run_cases).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.schedules import build_schedule, simulate
from tests.runtime.harness import Case, by_case, compare_to_reference, reference, run_cases

pytestmark = pytest.mark.slow

EVAL = [Case("dualpipe", 4, 8, forward_only=True), Case("dualpipev", 2, 5, forward_only=True),
        Case("zb1p", 4, 5, forward_only=True), Case("1f1b", 2, 3, forward_only=True)]
# Sequence length 4, 5, 6 over three steps: new headers each step, new buffers, same results.
VARY = [Case("dualpipev", 4, 8, steps=3, vary_seq=True), Case("dualpipe", 2, 4, steps=3, vary_seq=True),
        Case("zb1p", 2, 3, steps=3, vary_seq=True),
        Case("dualpipev", 2, 5, steps=2, vary_seq=True, options={"shapes_per_microbatch": True})]
# Reentrant torch.utils.checkpoint inside every block, with the W split on.
CHECKPOINT = [Case("dualpipev", 2, 5, checkpoint=True), Case("zb1p", 4, 5, checkpoint=True),
              Case("dualpipe", 2, 4, checkpoint=True), Case("dualpipev", 4, 9, steps=2, checkpoint=True)]
# Two training steps with an optimizer between them: the second step runs on updated parameters.
MIRROR = [Case("dualpipe", 4, 8, steps=2, optimizer="adam"), Case("dualpipe", 4, 12, steps=2, optimizer="sgd"),
          Case("dualpipe", 2, 4, steps=2, optimizer="adam")]
NO_SPLIT = [Case("zb1p", 2, 3, options={"split_weights": False}), Case("zb1p", 4, 5, options={"split_weights": False}),
            Case("dualpipev", 2, 5, options={"split_weights": False}),
            Case("dualpipev", 2, 5, checkpoint=True, options={"split_weights": False})]
HOOKS = [Case("zb1p", 2, 3), Case("zb1p", 4, 5), Case("dualpipev", 2, 5), Case("dualpipev", 4, 8),
         Case("dualpipev", 2, 5, checkpoint=True), Case("zb1p", 4, 5, checkpoint=True)]

# Control: without the split the same instrumentation sees Linear gradients arrive during I ops.
HOOKS_UNSPLIT = Case("zb1p", 2, 3, options={"split_weights": False})

JOBS = [("steps", c) for c in EVAL + VARY + CHECKPOINT + MIRROR + NO_SPLIT] + [("hooks", c) for c in HOOKS]
JOBS += [("hooks", HOOKS_UNSPLIT)]


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str], list[dict]]:
    results = run_local(run_cases, 4, args=(JOBS,), timeout_s=240)
    return {(kind, case.id): reports for (kind, case), reports in zip(JOBS, by_case(results, JOBS))}


@pytest.mark.parametrize("case", EVAL, ids=lambda c: c.id)
def test_eval_losses_equal_reference_and_no_gradients(runs, case: Case) -> None:
    reports = runs[("steps", case.id)]
    ref = reference(case)
    compare_to_reference(case, reports, ref)  # with forward_only it asserts every .grad is None
    for report in reports:
        assert all(grad is None for grad in report["grads"][0].values())
        assert torch.equal(report["total_loss"], ref["mean_loss"][0])


@pytest.mark.parametrize("case", VARY, ids=lambda c: c.id)
def test_variable_sequence_length_across_steps(runs, case: Case) -> None:
    reports = runs[("steps", case.id)]
    ref = reference(case)
    compare_to_reference(case, reports, ref)
    for report in reports:
        assert [torch.equal(total, mean) for total, mean in zip(report["total_losses"], ref["mean_loss"])] == [True] * case.steps


@pytest.mark.parametrize("case", CHECKPOINT, ids=lambda c: c.id)
def test_weight_split_under_activation_checkpointing_is_bit_exact(runs, case: Case) -> None:
    reports = runs[("steps", case.id)]
    compare_to_reference(case, reports, reference(case))
    expected = simulate(build_schedule(case.schedule, case.ranks, case.microbatches)).peak_activations_per_rank
    assert all(r["peaks"] == [expected[r["rank"]]] * case.steps for r in reports)


@pytest.mark.parametrize("case", MIRROR, ids=lambda c: c.id)
def test_mirror_copies_identical_after_optimizer_steps(runs, case: Case) -> None:
    reports = runs[("steps", case.id)]
    ref = reference(case)
    compare_to_reference(case, reports, ref)  # both steps' gradients, on both copies of every stage
    placement = build_schedule(case.schedule, case.ranks, case.microbatches).placement
    for stage in range(case.ranks):
        # Stage s lives on rank s as chunk 0 and on rank P-1-s as chunk 1.
        assert placement.stage(stage, 0) == stage and placement.stage(case.ranks - 1 - stage, 1) == stage
        holders = [r for r in reports if r["rank"] in (stage, case.ranks - 1 - stage)]
        names = [n for n in ref["params"] if n.startswith(f"stage{stage}.")]
        assert names
        for name in names:
            copies = [r["params"][name] for r in holders]
            assert len(copies) == 2 * (4 // case.ranks)
            for copy in copies:
                assert torch.equal(copy, copies[0]), f"{case.id}: the copies of {name} diverged"
            assert torch.equal(copies[0], ref["params"][name]), f"{case.id}: {name} differs from the reference"
        assert any(not torch.equal(ref["params"][n], p) for n, p in _initial_params(case).items() if n in names)


def _initial_params(case: Case) -> dict[str, torch.Tensor]:
    from dataclasses import replace

    return reference(replace(case, steps=0))["params"]


@pytest.mark.parametrize("case", NO_SPLIT, ids=lambda c: c.id)
def test_split_weights_off_gives_the_same_gradients(runs, case: Case) -> None:
    reports = runs[("steps", case.id)]
    compare_to_reference(case, reports, reference(case))
    split = [c for c in HOOKS if (c.schedule, c.ranks, c.microbatches, c.checkpoint)
             == (case.schedule, case.ranks, case.microbatches, case.checkpoint)]
    if split:  # and the same as the split run of the same case, rank by rank
        for plain, deferred in zip(reports, runs[("hooks", split[0].id)]):
            assert plain["rank"] == deferred["rank"]
            for name, grad in plain["grads"][0].items():
                assert torch.equal(grad, deferred["grads"][0][name])


@pytest.mark.parametrize("case", HOOKS, ids=lambda c: c.id)
def test_weight_split_defers_and_hooks_fire_once_per_microbatch(runs, case: Case) -> None:
    reports = runs[("hooks", case.id)]
    compare_to_reference(case, reports, reference(case))
    deferred = 0
    for report in reports:
        log = report["log"]
        assert log, "no post-accumulate-grad hook fired"
        assert not [entry for entry in log if entry[3]], "a hook fired with grad None"
        counts = Counter(name for name, *_ in log)
        # Every Linear and LayerNorm parameter of this rank's chunks, once per micro-batch.
        assert set(counts.values()) == {case.microbatches}, counts
        for name, kind, action, _ in log:
            forward, _, backward = action.partition("&")
            running = backward or forward  # a pair's hooks fire in its backward half
            assert running[0] in "IBW", f"{name} accumulated outside a backward op, in {action}"
            if kind == "Linear":
                # Split: never during an I (input gradients only); in the W op or a full B.
                assert running[0] in "BW", f"Linear {name} accumulated during {action}: the W split did not defer"
                deferred += running[0] == "W"
            else:
                # LayerNorm does not split: its weight gradients come in the I (or B) op.
                assert running[0] in "IB", f"{kind} {name} accumulated during {action}"
    assert deferred > 0, "no Linear gradient was accumulated by a W op"


def test_hook_log_sees_linear_gradients_in_i_without_the_split(runs) -> None:
    reports = runs[("hooks", HOOKS_UNSPLIT.id)]
    compare_to_reference(HOOKS_UNSPLIT, reports, reference(HOOKS_UNSPLIT))
    for report in reports:
        linear_actions = {action[0] for _, kind, action, _ in report["log"] if kind == "Linear"}
        assert linear_actions == {"I"}, linear_actions
        assert set(Counter(name for name, *_ in report["log"]).values()) == {HOOKS_UNSPLIT.microbatches}
