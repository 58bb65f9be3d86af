"""The plugin's schedules through Megatron-Core 0.16.1 (CPU/gloo): equal to Megatron's own schedules.

Every run uses ``tests/megatron/harness.py``: a tiny fp32 GPT (local spec) with weights drawn per global
parameter name, Megatron's DDP wrapper and ``finalize_model_grads``, the plugin's
``get_forward_backward_func()`` (dispatching on ``config.pipeline_schedule``) against Megatron's
``get_forward_backward_func()`` and the unpipelined single-process reference. Three launches (1, 2 and 4
processes) run all specs; the tests read their results.

Exactness (fp32), measured and asserted:

- ``1f1b``/``zb1p`` vs Megatron's 1F1B (same stages): losses and every gradient bit-identical, the tied
  embedding included. zb1p defers the weight gradients of Megatron's parallel linears to W ops.
- ``dualpipev`` (2P stages) vs Megatron interleaved (P × VP=2, the same 2P stages on other ranks): losses
  and every gradient bit-identical, tied embedding included, at P=2 and P=4; vs the PP=1 reference:
  bit-identical except the tied embedding (Megatron itself is ~1 ulp off there at PP>1; rtol 1e-5,
  atol 1e-7). Untied: every gradient bit-identical to PP=1.
- ``dualpipe``: losses bit-identical; gradients within rtol 1e-5 / atol 1e-7 (measured <= 4e-9): each
  stage's two copies sum half the micro-batches each and the halves are added at the end, a different
  association than Megatron's one running sum. The two copies are bit-identical to each other.
- MoE (alltoall, EP=2 × P=2): losses bit-identical to Megatron interleaved; gradients bit-identical except
  the tied embedding (<= 4e-9: the plugin ties before the data-parallel reduction, Megatron after).
- ``calculate_per_token_loss``: dualpipev equals Megatron interleaved bit for bit (the token count, computed
  on rank 0 in a V, reaches ``finalize_model_grads`` through the last rank as Megatron expects).
- Distributed optimizer, 3 Adam steps (P=2 × DP=2, untied embeddings): reported and per-micro-batch losses
  bit-identical to Megatron interleaved, with and without ``overlap_grad_reduce``; dualpipe within 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.reference.megatron_gpt import Parallel, TinyGPT
from dualpipe_plugin.reference.megatron_names import TIED_EMBEDDING
from tests.megatron.harness import (
    RunSpec,
    compare_grads,
    merge_results,
    reference_spec,
    run_megatron_specs,
)
from tests.megatron.marks import megatron_test

DENSE4 = TinyGPT(num_layers=4)
UNTIED4 = TinyGPT(num_layers=4, share_embeddings=False)
DENSE8 = TinyGPT(num_layers=8)
MOE4 = TinyGPT(num_layers=4, num_moe_experts=4, moe_router_topk=2)
TIMEOUT_S = 420

PP2 = Parallel(pp=2)
PER_TOKEN = (("calculate_per_token_loss", True),)
OPT = dict(iterations=3, optimizer=True, distributed_optimizer=True)

PP2_SPECS = {
    "megatron_1f1b": RunSpec(model=DENSE4, parallel=PP2),
    "1f1b": RunSpec(model=DENSE4, parallel=PP2, schedule="1f1b"),
    "zb1p": RunSpec(model=DENSE4, parallel=PP2, schedule="zb1p"),
    "megatron_interleaved": RunSpec(model=DENSE4, parallel=Parallel(pp=2, vp=2)),
    "dualpipev": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipev"),
    "zbv": RunSpec(model=DENSE4, parallel=PP2, schedule="zbv"),
    "dualpipev_shared_c5": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipev", num_microbatches=5,
                                   shared_iterator=True),
    "dualpipev_untied": RunSpec(model=UNTIED4, parallel=PP2, schedule="dualpipev"),
    "dualpipe": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipe"),
    "dualpipe_shared": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipe", shared_iterator=True),
    "per_token_megatron": RunSpec(model=DENSE4, parallel=Parallel(pp=2, vp=2), config_overrides=PER_TOKEN),
    "per_token_dualpipev": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipev", config_overrides=PER_TOKEN),
    "eval_megatron": RunSpec(model=DENSE4, parallel=PP2, forward_only=True),
    "eval_dualpipev": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipev", forward_only=True),
    "eval_dualpipe": RunSpec(model=DENSE4, parallel=PP2, schedule="dualpipe", forward_only=True),
}

PP4_SPECS = {  # 4 processes
    "megatron_interleaved_p4": RunSpec(model=DENSE8, parallel=Parallel(pp=4, vp=2), num_microbatches=8),
    "dualpipev_p4": RunSpec(model=DENSE8, parallel=Parallel(pp=4), num_microbatches=8, schedule="dualpipev"),
    "megatron_1f1b_p4": RunSpec(model=DENSE4, parallel=Parallel(pp=4), num_microbatches=8),
    "dualpipe_p4": RunSpec(model=DENSE4, parallel=Parallel(pp=4), num_microbatches=8, schedule="dualpipe"),
    "moe_megatron": RunSpec(model=MOE4, parallel=Parallel(pp=2, vp=2, ep=2)),
    "moe_dualpipev": RunSpec(model=MOE4, parallel=Parallel(pp=2, ep=2), schedule="dualpipev"),
    "moe_dualpipev_overlap": RunSpec(model=MOE4, parallel=Parallel(pp=2, ep=2), schedule="dualpipev", overlap=True),
    "distopt_megatron": RunSpec(model=UNTIED4, parallel=Parallel(pp=2, vp=2), **OPT),
    "distopt_dualpipev": RunSpec(model=UNTIED4, parallel=PP2, schedule="dualpipev", **OPT),
    "distopt_dualpipev_overlap": RunSpec(model=UNTIED4, parallel=PP2, schedule="dualpipev", overlap_grad_reduce=True,
                                         **OPT),
    "distopt_megatron_1f1b": RunSpec(model=UNTIED4, parallel=PP2, **OPT),
    "distopt_dualpipe": RunSpec(model=UNTIED4, parallel=PP2, schedule="dualpipe", **OPT),
}

REFERENCE_SPECS = {
    "dense4_c4": RunSpec(model=DENSE4),
    "dense4_c5": RunSpec(model=DENSE4, num_microbatches=5),
    "untied4_c4": RunSpec(model=UNTIED4),
    "dense8_c8": RunSpec(model=DENSE8, num_microbatches=8),
    "dense4_c8": RunSpec(model=DENSE4, num_microbatches=8),
    "moe4_dp2": reference_spec(PP4_SPECS["moe_dualpipev"], data_parallel=2),
}


def _launch(specs: dict[str, RunSpec], world_size: int) -> dict:
    names = list(specs)
    per_rank = run_local(run_megatron_specs, world_size, args=(tuple(specs[n] for n in names),), timeout_s=TIMEOUT_S)
    return {name: merge_results([results[i] for results in per_rank]) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def refs(megatron_core):
    return _launch(REFERENCE_SPECS, 1)


@pytest.fixture(scope="module")
def pp2(megatron_core):
    names = list(PP2_SPECS)
    per_rank = run_local(_pp2_rank, 2, args=(tuple(PP2_SPECS[n] for n in names),), timeout_s=TIMEOUT_S)
    merged = {name: merge_results([results[i] for results in per_rank]) for i, name in enumerate(names)}
    merged["_probes"] = [results[len(names)] for results in per_rank]
    merged["_keys"] = [results[len(names) + 1] for results in per_rank]
    return merged


@pytest.fixture(scope="module")
def pp4(megatron_core):
    return _launch(PP4_SPECS, 4)


def _same_losses(got, want) -> None:
    assert got.microbatch_losses == want.microbatch_losses
    assert got.losses == want.losses


def _assert_v_schedule_equals(got, interleaved, reference) -> None:
    """Bit for bit Megatron interleaved on the same 2P stages; the unpipelined reference except the tied
    embedding."""
    _same_losses(got, interleaved)
    compare_grads(got.grads[0], interleaved.grads[0], exact=True)
    _same_losses(got, reference)
    compare_grads(got.grads[0], reference.grads[0], exact=True, approx={TIED_EMBEDDING})


def _assert_dualpipe_matches(got, megatron_1f1b, reference) -> None:
    """Losses bit for bit; gradients to rtol 1e-5 / atol 1e-7 (each copy sums half the micro-batches)."""
    _same_losses(got, megatron_1f1b)
    _same_losses(got, reference)
    compare_grads(got.grads[0], megatron_1f1b.grads[0], exact=False, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------- probes (2 ranks)


def _pp2_rank(rank: int, world_size: int, specs):
    """The PP=2 specs, then two probes in the same processes (a launch costs ~15 s here)."""
    results = run_megatron_specs(rank, world_size, specs)
    return results + [_probe_weight_split(), _probe_checkpoint_keys()]


def _probe_weight_split() -> dict:
    """zb1p and dualpipev on undecorated chunks: which linears are split, and where their W ran."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from dualpipe_plugin.megatron import enable_cpu_mode
    from dualpipe_plugin.megatron.schedule_fn import PipelineScheduleFunction
    from dualpipe_plugin.reference.megatron_gpt import (
        destroy_parallel,
        forward_step,
        init_parallel,
        transformer_config,
    )
    from tests.megatron.harness import build_model, data_iterator, make_batches

    out = {}
    with enable_cpu_mode():
        for schedule in ("zb1p", "dualpipev"):
            init_parallel(PP2, DENSE4.seed)
            try:
                config = transformer_config(DENSE4, PP2)
                chunks = build_model(DENSE4, PP2, config, schedule)
                function = PipelineScheduleFunction(schedule)
                pipeline = function.pipeline_for(chunks)
                store = pipeline.executor.store
                counts = {"deferred": 0, "immediate": 0}
                defer = store.defer

                def counting_defer(closure, _defer=defer, _store=store):
                    counts["deferred" if _store.capturing else "immediate"] += 1
                    return _defer(closure)

                store.defer = counting_defer
                from megatron.core import parallel_state

                first = parallel_state.get_data_parallel_rank() * 4
                function(forward_step_func=forward_step, data_iterator=data_iterator(make_batches(DENSE4, 0, first, 4)),
                         model=chunks, num_microbatches=4, seq_length=DENSE4.seq_length,
                         micro_batch_size=DENSE4.micro_batch_size)
                linears = sum(isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                              for chunk in chunks for m in chunk.modules())
                out[schedule] = dict(counts, linears=linears, split=sum(b.num_split_linears for b in pipeline.executor.split_bindings),
                                     pending=len(store.pending_keys()))
            finally:
                destroy_parallel()
    return out


def _probe_checkpoint_keys() -> dict:
    """Sharded-state-dict entries (key, global offset, replica) of every chunk for three layouts."""
    from dualpipe_plugin.megatron import enable_cpu_mode
    from dualpipe_plugin.reference.megatron_gpt import destroy_parallel, init_parallel, transformer_config
    from tests.megatron.harness import build_model

    out = {}
    with enable_cpu_mode():
        for name, schedule, parallel in (("interleaved", None, Parallel(pp=2, vp=2)), ("dualpipev", "dualpipev", PP2)):
            init_parallel(parallel, DENSE4.seed)
            try:
                config = transformer_config(DENSE4, parallel)
                chunks = build_model(DENSE4, parallel, config, schedule)
                entries = []
                for chunk in chunks:
                    for value in chunk.sharded_state_dict().values():
                        if hasattr(value, "global_offset"):
                            entries.append((value.key, tuple(value.global_offset), tuple(value.replica_id)))
                out[name] = sorted(entries)
            finally:
                destroy_parallel()
    return out


# ------------------------------------------------------------------------------------------ tests


@megatron_test
@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_1f1b_and_zb1p_equal_megatrons_1f1b_bit_for_bit(schedule, pp2, refs):
    _same_losses(pp2[schedule], pp2["megatron_1f1b"])
    compare_grads(pp2[schedule].grads[0], pp2["megatron_1f1b"].grads[0], exact=True)
    _same_losses(pp2[schedule], refs["dense4_c4"])


@megatron_test
@pytest.mark.parametrize("schedule", ["dualpipev", "zbv"])
def test_v_schedules_p2_equal_megatron_interleaved_and_reference(schedule, pp2, refs):
    _assert_v_schedule_equals(pp2[schedule], pp2["megatron_interleaved"], refs["dense4_c4"])


@megatron_test
def test_dualpipev_untied_every_gradient_bit_identical_to_unpipelined(pp2, refs):
    got, want = pp2["dualpipev_untied"], refs["untied4_c4"]
    _same_losses(got, want)
    compare_grads(got.grads[0], want.grads[0], exact=True)
    assert "output_layer.weight" in got.grads[0]


@megatron_test
def test_dualpipev_one_shared_iterator_and_odd_microbatch_count(pp2, refs):
    got, want = pp2["dualpipev_shared_c5"], refs["dense4_c5"]
    _same_losses(got, want)
    compare_grads(got.grads[0], want.grads[0], exact=True, approx={TIED_EMBEDDING})


@megatron_test
@pytest.mark.parametrize("name", ["dualpipe", "dualpipe_shared"])
def test_dualpipe_p2_matches_megatron_1f1b(name, pp2, refs):
    # merge_results already asserted that both mirrored copies of every stage hold identical gradients.
    _assert_dualpipe_matches(pp2[name], pp2["megatron_1f1b"], refs["dense4_c4"])


@megatron_test
def test_per_token_loss_scaling_equals_megatron(pp2):
    # The loss is not divided in the schedule; finalize_model_grads divides every gradient by the token
    # count it receives from the last pipeline rank (the V computes it on rank 0).
    got, want = pp2["per_token_dualpipev"], pp2["per_token_megatron"]
    _same_losses(got, want)
    compare_grads(got.grads[0], want.grads[0], exact=True)
    assert not np.array_equal(got.grads[0][TIED_EMBEDDING], pp2["dualpipev"].grads[0][TIED_EMBEDDING])


@megatron_test
def test_forward_only_reports_the_same_losses_on_the_last_rank(pp2):
    want = pp2["eval_megatron"]
    assert len(want.microbatch_losses[0]) == 4
    for name in ("eval_dualpipev", "eval_dualpipe"):
        _same_losses(pp2[name], want)
        assert pp2[name].grads[0] == {}


@megatron_test
def test_weight_split_defers_every_megatron_linear(pp2):
    for probe in pp2["_probes"]:
        for schedule, counts in probe.items():
            assert counts["split"] == counts["linears"] > 0, (schedule, counts)
            assert counts["pending"] == 0, "every deferred weight gradient ran in a W op"
            # zb1p splits every backward; dualpipev runs some full B (and its F&B pairs) too.
            assert counts["deferred"] > 0, (schedule, counts)
            if schedule == "zb1p":
                assert counts["immediate"] == 0, counts


@megatron_test
def test_checkpoint_keys_are_global_layer_numbers(pp2):
    entries = {name: [] for name in ("interleaved", "dualpipev")}
    for probe in pp2["_keys"]:
        for name, items in probe.items():
            entries[name] += items
    assert sorted(entries["dualpipev"]) == sorted(entries["interleaved"])
    layers = sorted({offset[0] for key, offset, _ in entries["dualpipev"] if key.startswith("decoder.layers.")})
    assert layers == [0, 1, 2, 3]


@megatron_test
def test_dualpipev_p4_equals_megatron_interleaved_and_reference(pp4, refs):
    _assert_v_schedule_equals(pp4["dualpipev_p4"], pp4["megatron_interleaved_p4"], refs["dense8_c8"])


@megatron_test
def test_dualpipe_p4_matches_megatron_1f1b(pp4, refs):
    _assert_dualpipe_matches(pp4["dualpipe_p4"], pp4["megatron_1f1b_p4"], refs["dense4_c8"])


@megatron_test
def test_moe_overlap_from_the_schedule_function_is_bit_exact_and_hides_the_all_to_all(pp4):
    """overlap=True on the get_forward_backward_func path: the F&B pairs run through the overlap engine on
    Megatron's own TransformerLayer methods (data read through forward_step_func's schedule-plan convention),
    with losses and every gradient bit-identical to overlap off, and expert all-to-alls hidden behind the
    other side's compute."""
    got, want = pp4["moe_dualpipev_overlap"], pp4["moe_dualpipev"]
    _same_losses(got, want)
    compare_grads(got.grads[0], want.grads[0], exact=True)
    assert got.hidden_transfers > 0 and want.hidden_transfers == 0


def test_moe_alltoall_ep2_pp2_dualpipev_equals_megatron_interleaved(pp4, refs):
    got, want = pp4["moe_dualpipev"], pp4["moe_megatron"]
    _same_losses(got, want)
    compare_grads(got.grads[0], want.grads[0], exact=True, approx={TIED_EMBEDDING}, rtol=1e-5, atol=1e-7)
    assert any(".local_experts.3." in name for name in got.grads[0]), "experts of both EP ranks are there"
    ref = refs["moe4_dp2"]
    assert got.microbatch_losses == ref.microbatch_losses
    assert got.losses == pytest.approx(ref.losses, rel=1e-6)
    compare_grads(got.grads[0], ref.grads[0], exact=False, rtol=1e-5, atol=1e-7)


@megatron_test
@pytest.mark.parametrize("name", ["distopt_dualpipev", "distopt_dualpipev_overlap"])
def test_distributed_optimizer_three_steps_equal_megatron(name, pp4):
    got, want = pp4[name], pp4["distopt_megatron"]
    assert len(got.losses) == 3 and all(math.isfinite(x) for x in got.losses)
    _same_losses(got, want)


@megatron_test
def test_distributed_optimizer_three_steps_dualpipe(pp4):
    got, want = pp4["distopt_dualpipe"], pp4["distopt_megatron_1f1b"]
    assert got.microbatch_losses[0] == want.microbatch_losses[0]
    np.testing.assert_allclose(np.array(got.microbatch_losses), np.array(want.microbatch_losses), rtol=1e-6)
