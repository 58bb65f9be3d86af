"""Megatron-Core 0.16 on CPU/gloo through ``enable_cpu_mode``: its own schedules against a reference.

Every multi-process test runs Megatron's ``get_forward_backward_func()``, DDP wrapper and
``finalize_model_grads`` on a tiny fp32 GPT (``tests/megatron/harness.py``) and compares with the
unpipelined single-process run of the same weights and data.

Tolerances (fp32):
- Pipeline layouts (PP=2, PP=4, PP=2 × VP=2): per-micro-batch losses, the reported loss and every
  gradient are bit-identical to PP=1 — the same ops on the same shapes, activations and gradients move
  between stages as exact copies, and each parameter accumulates micro-batches in the same order. The one
  exception is the tied word embedding: PP=1 adds the output-layer and embedding contributions inside
  each micro-batch's backward, while PP>1 sums each copy over the micro-batches on its own stage and
  ``finalize_model_grads`` adds the two sums (measured |diff| ~7e-9 on values ~8e-2); checked with
  ``rtol=1e-5, atol=1e-7``. With untied embeddings every gradient is bit-identical (checked by hand).
- MoE at EP=2 (DP=2): per-micro-batch losses are bit-identical; gradients are the DP average of two
  half-batch sums versus one sequential sum (measured |diff| <= 8e-9), checked with ``rtol=1e-5,
  atol=1e-7``; the reported (token-weighted, DP all-reduced) loss with ``rel=1e-6``.
- Distributed optimizer vs. plain DDP at PP=2 × DP=2: losses bit-identical over 2 optimizer steps.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.reference.megatron_gpt import Parallel, TinyGPT
from dualpipe_plugin.reference.megatron_names import TIED_EMBEDDING
from tests.megatron.harness import (
    RunSpec,
    compare_grads,
    merge_results,
    reference_spec,
    run_megatron,
    run_megatron_specs,
)
from tests.megatron.marks import megatron_test

DENSE = TinyGPT(num_layers=4)
MOE = TinyGPT(num_layers=2, num_moe_experts=4, moe_router_topk=2)
TIMEOUT_S = 240


def _run(spec: RunSpec, world_size: int):
    return merge_results(run_local(run_megatron, world_size, args=(spec,), timeout_s=TIMEOUT_S))


@pytest.fixture(scope="module")
def dense_reference(megatron_core):
    return _run(RunSpec(model=DENSE, num_microbatches=4), 1)


# ----------------------------------------------------------------------------------- (i) the switch


def test_importing_the_adapter_imports_neither_torch_nor_megatron():
    # Runs without Megatron installed too: the adapter package must import cleanly there.
    code = (
        "import sys, dualpipe_plugin.megatron as m; "
        "assert not m.is_cpu_mode_active(); "
        "bad = [n for n in ('torch', 'megatron') if n in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _stored(owner, attr):
    return owner.__dict__.get(attr, "<absent>")


@megatron_test
def test_cpu_mode_is_opt_in_idempotent_and_undone(monkeypatch):
    import torch
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils as transformer_utils

    from dualpipe_plugin.megatron import cpu_mode_patches, enable_cpu_mode, is_cpu_mode_active

    planned = cpu_mode_patches()
    before = {(id(p.owner), p.attr): _stored(p.owner, p.attr) for p in planned}
    # Not active unless called: every target still holds Megatron's own object.
    assert not is_cpu_mode_active()
    assert schedules.torch is torch
    assert fused_softmax.get_default_causal_mask is transformer_utils.get_default_causal_mask

    first = enable_cpu_mode()
    second = enable_cpu_mode()  # idempotent: nothing applied twice
    try:
        assert is_cpu_mode_active() and first.active and second.active
        assert first.patches == second.patches
        assert [p.target for p in first.patches] == [p.target for p in planned]
        for patch in first.patches:
            assert _stored(patch.owner, patch.attr) is patch.replacement, patch.target
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        first.disable()
        first.disable()  # releasing a handle twice is a no-op
        assert is_cpu_mode_active(), "the second handle still holds CPU mode"
    finally:
        second.disable()
        first.disable()
    assert not is_cpu_mode_active()
    after = {(id(p.owner), p.attr): _stored(p.owner, p.attr) for p in planned}
    assert after == before  # identity of every original restored (absent ones absent again)
    assert all(after[k] is before[k] for k in before)

    with enable_cpu_mode() as mode:
        assert mode.active
    assert not mode.active and not is_cpu_mode_active()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="force=True"):
        enable_cpu_mode()
    assert not is_cpu_mode_active()
    with enable_cpu_mode(force=True):
        assert is_cpu_mode_active()
    assert not is_cpu_mode_active()


# ------------------------------------------------------------------- (ii) 1F1B, (iii) interleaved


@megatron_test
@pytest.mark.parametrize("pp", [2, 4])
def test_1f1b_matches_unpipelined_bit_for_bit(pp, dense_reference):
    got = _run(RunSpec(model=DENSE, parallel=Parallel(pp=pp), num_microbatches=4), pp)
    assert got.microbatch_losses == dense_reference.microbatch_losses
    assert got.losses == dense_reference.losses
    compare_grads(got.grads[0], dense_reference.grads[0], exact=True, approx={TIED_EMBEDDING})


@megatron_test
@pytest.mark.parametrize(
    "p2p",
    [
        pytest.param((), id="blocking-p2p"),
        # The interleaved schedule's async sends, with outputs freed after sending (Megatron-LM's
        # default): without CPU mode's send copies gloo sends freed memory (measured: wrong loss).
        pytest.param((("overlap_p2p_comm", True), ("deallocate_pipeline_outputs", True)), id="overlap-p2p"),
    ],
)
def test_interleaved_vp2_matches_unpipelined_bit_for_bit(p2p, dense_reference):
    spec = RunSpec(model=DENSE, parallel=Parallel(pp=2, vp=2), num_microbatches=4, config_overrides=p2p)
    got = _run(spec, 2)
    assert got.microbatch_losses == dense_reference.microbatch_losses
    assert got.losses == dense_reference.losses
    compare_grads(got.grads[0], dense_reference.grads[0], exact=True, approx={TIED_EMBEDDING})


# ---------------------------------------------------------------------------------- (iv) MoE, EP=2


@megatron_test
def test_moe_alltoall_ep2_matches_reference():
    spec = RunSpec(model=MOE, parallel=Parallel(ep=2), num_microbatches=2)
    got = _run(spec, 2)  # EP=2 × DP=2: each rank runs its own 2 micro-batches, experts split 2 + 2
    ref = _run(reference_spec(spec, data_parallel=2), 1)
    assert got.microbatch_losses == ref.microbatch_losses
    assert got.losses == pytest.approx(ref.losses, rel=1e-6)
    compare_grads(got.grads[0], ref.grads[0], exact=False, rtol=1e-5, atol=1e-7)
    assert any(".local_experts.3." in name for name in got.grads[0]), "expert names are global"


# ------------------------------------------------------------- (v) DDP + distributed optimizer


@megatron_test
def test_distributed_optimizer_pp2_dp2_matches_plain_ddp():
    plain = RunSpec(
        model=DENSE, parallel=Parallel(pp=2), num_microbatches=2, iterations=2, optimizer=True
    )
    distributed = RunSpec(
        model=DENSE, parallel=Parallel(pp=2), num_microbatches=2, iterations=2, optimizer=True,
        distributed_optimizer=True,
    )
    per_rank = run_local(run_megatron_specs, 4, args=((plain, distributed),), timeout_s=TIMEOUT_S)
    got_plain = merge_results([results[0] for results in per_rank])
    got_dist = merge_results([results[1] for results in per_rank])
    assert len(got_plain.losses) == 2 and all(math.isfinite(x) for x in got_plain.losses)
    assert got_dist.losses == got_plain.losses
    assert got_dist.microbatch_losses == got_plain.microbatch_losses
