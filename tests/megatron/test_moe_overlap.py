"""Megatron-Core MoE layers on the overlap protocol (``dualpipe_plugin.megatron.moe_overlap``), on CPU/gloo.

Every comparison is bit-exact (``torch.equal``; fp32, one case bf16): each sub-stage runs Megatron's own code on the
same tensors, the transfers move the same rows with the same split sizes, and every parameter
accumulates its micro-batches in the same order.

Two launches (spawning costs seconds per process here), each running several checks:

- P=1 × EP=2 (2 processes; rank 1's input repeats one token, so its tokens all take the same
  experts and the routing is one-sided), and the same checks at P=1 × EP=1 (1 process):
  1. one staged MoE ``TransformerLayer`` (top-1, top-2, with shared experts) vs ``layer(hidden_states=...)``
     + autograd: output, input gradient and every parameter gradient; a dense layer likewise; a second
     forward run between the sub-stages of a first leaves the first's output unchanged; a layer with
     the allgather dispatcher is refused;
  2. ``megatron_staged_chunk(gpt)`` vs ``gpt(ids, pos, None, labels=...)``: logits or per-token loss and
     all gradients, learned-absolute and RoPE position embeddings, tied and untied output layers, a bf16
     model inside ``Float16Module``, and under ``no_grad``;
  3. an F&B pair of two chunks of MoE layers through ``run_pair_sides``: overlapped == sequential
     (outputs, input and parameter gradients) == the plain layers; the engine's trace shows each side's
     dispatch/combine in flight while the other side computes;
  4. ``DualPipeline`` dualpipev (P=1: two chunks on one rank, F&B pairs through the overlap engine) vs
     Megatron's own ``get_forward_backward_func()`` (no pipelining) on the same model and data: losses
     and every gradient, with overlap on and off.
- P=2 × EP=2 (4 processes, ``DualPipeline`` dualpipev over two pipelines whose stage-s ranks form the
  EP groups) vs Megatron's schedule on each process with its replica's data: losses and gradients.
"""

from __future__ import annotations

from functools import partial

import pytest

from dualpipe_plugin.launch import run_local
from tests.megatron.marks import megatron_test

TIMEOUT_S = 240
NUM_MICROBATCHES = 4


# ------------------------------------------------------------------------------------ worker helpers


def _gpt(tiny, config, *, pre=True, post=True, rope=False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from dualpipe_plugin.megatron.compat import reset_moe_metrics
    from dualpipe_plugin.reference.megatron_names import init_for_comparison

    # Megatron's aux-loss log is a process-global sized by the first model's layer count.
    reset_moe_metrics()
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=tiny.num_moe_experts, moe_grouped_gemm=False),
        vocab_size=tiny.vocab_size, max_sequence_length=tiny.seq_length, pre_process=pre, post_process=post,
        share_embeddings_and_output_weights=tiny.share_embeddings,
        position_embedding_type="rope" if rope else "learned_absolute",
    )
    init_for_comparison(gpt, tiny.seed)
    return gpt


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _diff(a: dict, b: dict) -> list[str]:
    """Names whose gradients differ (or exist on one side only)."""
    import torch

    return sorted(set(a) ^ set(b)) + [n for n in a if n in b and not torch.equal(a[n], b[n])]


def _hidden(tiny, rank: int, seed: int = 0):
    """[s, b, h] input; on rank 1 every token is the same vector (one-sided routing)."""
    import torch

    gen = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(tiny.seq_length, tiny.micro_batch_size, tiny.hidden_size, generator=gen)
    if rank == 1:
        x[:] = x[0, 0]
    return x, torch.randn(x.shape, generator=gen)


def _check_layers(rank, tiny_moe, tiny_dense, par) -> dict:
    """1. One staged layer (MoE with top-1 and top-2 routing, dense) vs Megatron's layer forward + autograd;
    a layer with another dispatcher is refused."""
    import torch
    from dataclasses import replace

    from dualpipe_plugin.megatron.moe_overlap import MegatronLayerStages, MegatronOverlapError
    from dualpipe_plugin.runtime.staged import StagedChunk
    from dualpipe_plugin.reference.megatron_gpt import Parallel, transformer_config

    out = {}
    cases = (
        ("moe-top1", replace(tiny_moe, moe_router_topk=1), {"moe_router_pre_softmax": True}),  # Megatron's rule
        ("moe-top2", tiny_moe, {}),
        ("moe-shared", tiny_moe, {"moe_shared_expert_intermediate_size": 48}),  # computed in attn
        ("dense", tiny_dense, {}),
    )
    for kind, tiny, overrides in cases:
        # A dense config may not name an expert-parallel size (parallel_state keeps EP=2 for the MoE ones).
        gpt = _gpt(tiny, transformer_config(tiny, par if kind != "dense" else Parallel(), **overrides))
        layer = gpt.decoder.layers[0]
        x, grad_out = _hidden(tiny, rank)

        def run(fn):
            gpt.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_(True)
            y = fn(leaf)
            y.backward(grad_out)
            return y.detach(), leaf.grad, _grads(gpt)

        ref = run(lambda h: layer(hidden_states=h, attention_mask=None)[0])
        staged = StagedChunk([MegatronLayerStages(layer)])
        got = run(staged)
        out[kind] = {
            "kinds": [(s.name, s.kind.value) for s in staged.stages],
            "output": torch.equal(ref[0], got[0]), "input_grad": torch.equal(ref[1], got[1]),
            "grads": len(ref[2]), "differing": _diff(ref[2], got[2]),
        }
        if kind == "moe-top2":
            out[kind]["interleaved_forwards"] = _interleaved_forwards(staged, ref[0], x, grad_out)
        if kind != "dense":
            dispatcher = layer.mlp.token_dispatcher  # the last forward's split sizes
            splits = dispatcher.input_splits  # None at EP=1 (no all-to-all)
            out[kind]["send_splits"] = None if splits is None else [int(s) for s in splits]
            out[kind]["shared_experts"] = layer.mlp.use_shared_expert
    config = transformer_config(tiny_moe, par, moe_token_dispatcher_type="allgather")
    try:
        MegatronLayerStages(_gpt(tiny_moe, config).decoder.layers[0])
        out["allgather_refused"] = None
    except MegatronOverlapError as error:
        out["allgather_refused"] = str(error)
    return out


def _interleaved_forwards(staged, expected, x, grad_out) -> bool:
    """[Note: dispatcher state]: a second forward of the layer runs between the sub-stages of a first one
    (the dispatcher's attributes are overwritten meanwhile); the first still gives the layer's output."""
    import torch

    run = staged.begin((x,))
    values = (x,)
    for index in range(len(staged.stages)):
        values = run.forward(index, values).wait()
        if index == 0:
            other = torch.flip(x, dims=(0,)).requires_grad_(True)
            staged(other).backward(grad_out)
    return torch.equal(values[0].detach(), expected)


def _check_chunks(rank, tiny, par) -> list[dict]:
    """2. The whole GPTModel as one StagedChunk vs GPTModel.forward (and vs Float16Module.forward in bf16)."""
    import torch
    from dataclasses import replace

    from megatron.core.transformer.module import Float16Module

    from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk
    from dualpipe_plugin.reference.megatron_gpt import transformer_config
    from tests.megatron.harness import make_batches

    batch = make_batches(tiny, 0, rank, 1)[0]
    cases = [(rope, tied, False) for rope in (False, True) for tied in (True, False)] + [(False, True, True)]
    results = []
    for rope, tied, bf16 in cases:
        t = replace(tiny, share_embeddings=tied)
        overrides = dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16) if bf16 else {}
        config = transformer_config(t, par, **overrides)
        gpt = _gpt(t, config, rope=rope)
        model = Float16Module(config, gpt) if bf16 else gpt
        chunk = megatron_staged_chunk(model)
        for labels in (None, batch["labels"]):
            def run(fn):
                gpt.zero_grad(set_to_none=True)
                y = fn()
                (y.float().square().sum() if labels is None else y.sum()).backward()
                return y.detach(), _grads(gpt)

            ref = run(lambda: model(batch["tokens"], batch["position_ids"], None, labels=labels))
            got = run(lambda: chunk(batch["tokens"], batch["position_ids"], None, labels))
            with torch.no_grad():
                ref_eval = model(batch["tokens"], batch["position_ids"], None, labels=labels)
                got_eval = chunk(batch["tokens"], batch["position_ids"], None, labels)
            results.append({
                "case": f"rope={rope} tied={tied} bf16={bf16} labels={labels is not None}",
                "output": torch.equal(ref[0], got[0]) and ref[0].dtype == got[0].dtype,
                "no_grad": torch.equal(ref_eval, got_eval),
                "grads": len(ref[1]), "differing": _diff(ref[1], got[1]),
                "same_params": {id(p) for p in chunk.parameters()} == {id(p) for p in gpt.parameters()},
            })
    return results


def _overlaps(trace, comm_side: str, compute_side: str, kinds=("dispatch", "combine")) -> list[str]:
    """Transfers of ``comm_side`` during which a compute sub-stage of ``compute_side`` ran."""
    found = []
    for comm in trace:
        if comm.what != "comm" or not comm.side.startswith(comm_side) or not comm.stage.endswith(kinds):
            continue
        for compute in trace:
            if (compute.what == "compute" and compute.side.startswith(compute_side)
                    and comm.start <= compute.start and compute.end <= comm.end):
                found.append(f"{comm.stage} over {compute.stage}")
                break
    return found


def _check_pair(rank, tiny, par) -> dict:
    """3. F of chunk a & B of chunk b, overlapped vs sequential vs the plain layers."""
    import torch

    from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk
    from dualpipe_plugin.runtime.overlap import Side, run_pair_sides
    from dualpipe_plugin.runtime.staged import claim_backward
    from dualpipe_plugin.reference.megatron_gpt import transformer_config

    gpt = _gpt(tiny, transformer_config(tiny, par), pre=False, post=False)
    a = megatron_staged_chunk(gpt, layers=slice(0, 2))
    b = megatron_staged_chunk(gpt, layers=slice(2, 4))
    x_a, _ = _hidden(tiny, rank, seed=1)
    x_b, grad_b = _hidden(tiny, rank, seed=2)

    def pair(overlap: bool):
        gpt.zero_grad(set_to_none=True)
        leaf_a, leaf_b = x_a.clone().requires_grad_(True), x_b.clone().requires_grad_(True)
        out_b = b(leaf_b)
        trace, result = [], {}
        forward = Side("F", a, lambda: (a.begin((leaf_a,)), (leaf_a,)),
                       lambda run, outs: result.__setitem__("out", run.stitch(outs)[0]), trace=trace)
        backward = Side("B", b, lambda: claim_backward(b, [out_b], [grad_b]),
                        lambda run, grads: run.deposit_input_grads(grads), backward=True, trace=trace)
        run_pair_sides(forward, backward, overlap=overlap)
        return result["out"].detach(), leaf_b.grad, _grads(gpt), trace

    seq, ovl = pair(False), pair(True)

    # The plain layers: F of layers 0-1, B of layers 2-3 (Megatron's own forward + autograd).
    gpt.zero_grad(set_to_none=True)
    h = x_a.clone().requires_grad_(True)
    for layer in gpt.decoder.layers[:2]:
        h = layer(hidden_states=h, attention_mask=None)[0]
    leaf_b = x_b.clone().requires_grad_(True)
    y = leaf_b
    for layer in gpt.decoder.layers[2:]:
        y = layer(hidden_states=y, attention_mask=None)[0]
    y.backward(grad_b)
    plain = (h.detach(), leaf_b.grad, _grads(gpt))

    trace = ovl[3]
    return {
        "overlap_vs_sequential": {
            "output": torch.equal(ovl[0], seq[0]), "input_grad": torch.equal(ovl[1], seq[1]),
            "differing": _diff(ovl[2], seq[2]), "grads": len(seq[2]),
        },
        "overlap_vs_plain": {
            "output": torch.equal(ovl[0], plain[0]), "input_grad": torch.equal(ovl[1], plain[1]),
            "differing": _diff(ovl[2], plain[2]),
        },
        "forward_comm_over_backward_compute": _overlaps(trace, "F", "B"),
        "backward_comm_over_forward_compute": _overlaps(trace, "B", "F"),
        "sequential_overlaps": _overlaps(seq[3], "F", "B") + _overlaps(seq[3], "B", "F"),
        "order": [f"{e.side}:{e.stage}:{e.what}" for e in sorted(trace, key=lambda e: e.start)],
    }


# --- 4. DualPipeline vs Megatron's own schedule ------------------------------------------------------


def _loss_sum(logits, labels, loss_mask):
    """Sum of masked per-token cross entropies and the token count (Megatron-LM's GPT loss terms)."""
    import torch

    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    mask = loss_mask.reshape(-1).float()
    return torch.sum(losses * mask), mask.sum().to(torch.int)


def _pipeline_loss(logits, labels, loss_mask):
    """What Megatron's schedule back-propagates before its ``/ num_microbatches`` (the executor's divisor)."""
    import torch

    loss, num_tokens = _loss_sum(logits, labels, loss_mask)
    return loss / torch.clamp(num_tokens, min=1)


def _megatron_loss(batch, logits):
    """Megatron-LM's loss_func convention: ``(loss_sum, num_tokens, report)``."""
    import torch

    loss, num_tokens = _loss_sum(logits, batch["labels"], batch["loss_mask"])
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}


def _reset_aux_loss_scale() -> None:
    """The aux-loss scale is class state; a backward before any ``set_loss_scale`` (the layer checks)
    leaves a 0-d tensor that Megatron's ``set_loss_scale`` then cannot ``copy_`` its [1] scale into."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _megatron_step(gpt, batches) -> dict:
    """Megatron's own get_forward_backward_func() (no pipelining) on ``gpt``: per-micro-batch losses, grads."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], batch["position_ids"], None), partial(_megatron_loss, batch)

    _reset_aux_loss_scale()
    gpt.zero_grad(set_to_none=True)
    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=gpt,
        num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
        micro_batch_size=batches[0]["tokens"].shape[0], forward_only=False,
    )
    return {"losses": [float(d["lm loss"][0] / d["lm loss"][1]) for d in store], "grads": _grads(gpt)}


def _pipeline_step(gpt, chunks, transport, batches, overlap: bool, loss_scale_microbatches: int) -> dict:
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from dualpipe_plugin.runtime.pipeline import DualPipeline

    # What Megatron's forward_step sets before every backward: the aux-loss gradient scale.
    _reset_aux_loss_scale()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) * 1 / loss_scale_microbatches)
    gpt.zero_grad(set_to_none=True)
    pipe = DualPipeline(chunks, "dualpipev", loss_fn=_pipeline_loss, transport=transport, overlap=overlap)
    trace = []
    if pipe.executor.overlap is not None:
        pipe.executor.overlap.trace = trace
    cat = lambda key: torch.cat([b[key] for b in batches])  # noqa: E731
    inputs = (cat("tokens"), cat("position_ids")) if pipe.needs_inputs() else None
    labels = (cat("labels"), cat("loss_mask")) if pipe.needs_labels() else None
    result = pipe.step(inputs, labels, num_microbatches=len(batches), reduce_loss=False)
    pipe.close()
    return {
        "losses": {g: float(v) for g, v in result.losses.items()}, "grads": _grads(gpt),
        "engine": pipe.executor.overlap is not None, "pair_events": len(trace),
        "overlapped": len(_overlaps(trace, "F", "B")) + len(_overlaps(trace, "B", "F")),
    }


def _compare_steps(ref: dict, runs: dict[str, dict], params: set[str]) -> dict:
    """Each pipeline run vs the Megatron reference, on the parameters this rank's chunks hold."""
    out = {}
    for name, run in runs.items():
        ref_grads = {n: g for n, g in ref["grads"].items() if n in params}
        out[name] = {
            "engine": run["engine"], "pair_events": run["pair_events"], "overlapped": run["overlapped"],
            "losses": {g: (loss, ref["losses"][g]) for g, loss in run["losses"].items()},
            "grads": len(run["grads"]), "differing": _diff(run["grads"], ref_grads),
        }
    return out


def _check_pipeline_p1(rank, tiny, par) -> dict:
    """4. DualPipeline dualpipev at P=1 (both chunks here) vs Megatron's schedule, overlap on and off."""
    import torch.distributed as dist

    from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk
    from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups
    from dualpipe_plugin.reference.megatron_gpt import transformer_config
    from tests.megatron.harness import make_batches

    groups = new_pipeline_groups([[r] for r in range(dist.get_world_size())])
    transport = TorchTransport([rank], groups=groups[rank])
    gpt = _gpt(tiny, transformer_config(tiny, par))
    batches = make_batches(tiny, 0, rank * NUM_MICROBATCHES, NUM_MICROBATCHES)
    ref = _megatron_step(gpt, batches)
    chunks = [megatron_staged_chunk(gpt, layers=slice(0, 2)), megatron_staged_chunk(gpt, layers=slice(2, 4))]
    runs = {
        f"overlap={overlap}": _pipeline_step(gpt, chunks, transport, batches, overlap, NUM_MICROBATCHES)
        for overlap in (True, False)
    }
    return _compare_steps(ref, runs, {n for n, _ in gpt.named_parameters()})


def run_p1(rank: int, world_size: int) -> dict:
    from dataclasses import replace

    from dualpipe_plugin.megatron import enable_cpu_mode
    from dualpipe_plugin.reference.megatron_gpt import Parallel, TinyGPT, destroy_parallel, init_parallel

    moe = TinyGPT(num_layers=4, num_moe_experts=4, moe_router_topk=2, share_embeddings=False)
    par = Parallel(ep=world_size)
    with enable_cpu_mode():
        init_parallel(par, moe.seed)
        try:
            return {
                "layers": _check_layers(rank, replace(moe, num_layers=1), TinyGPT(num_layers=1), par),
                "chunks": _check_chunks(rank, replace(moe, num_layers=2), par),
                "pair": _check_pair(rank, moe, par),
                "pipeline": _check_pipeline_p1(rank, moe, par),
            }
        finally:
            destroy_parallel()


def run_p2_ep2(rank: int, world_size: int) -> dict:
    """P=2 × EP=2: Megatron's EP groups are {0, 1} and {2, 3}, so the pipelines are [0, 2] and [1, 3]
    (replica = rank % 2) and stage s of both replicas forms one EP group."""
    import torch.distributed as dist

    from dualpipe_plugin.megatron import enable_cpu_mode
    from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk
    from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups
    from dualpipe_plugin.reference.megatron_gpt import (
        Parallel, TinyGPT, destroy_parallel, init_parallel, transformer_config,
    )
    from tests.megatron.harness import make_batches

    moe = TinyGPT(num_layers=4, num_moe_experts=4, moe_router_topk=2, share_embeddings=False)
    par = Parallel(ep=2)
    with enable_cpu_mode():
        init_parallel(par, moe.seed)
        try:
            from megatron.core import parallel_state

            ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
            pipelines = [[0, 2], [1, 3]]
            replica, stage_rank = rank % 2, rank // 2
            groups = new_pipeline_groups(pipelines)
            transport = TorchTransport(pipelines[replica], groups=groups[replica])
            gpt = _gpt(moe, transformer_config(moe, par))
            batches = make_batches(moe, 0, replica * NUM_MICROBATCHES, NUM_MICROBATCHES)
            ref = _megatron_step(gpt, batches)
            stages = (stage_rank, 3 - stage_rank)  # dualpipev: rank r holds stages r and 2P-1-r
            chunks = [megatron_staged_chunk(gpt, layers=slice(s, s + 1)) for s in stages]
            params = {n for c in chunks for n, p in gpt.named_parameters() if any(p is q for q in c.parameters())}
            runs = {
                f"overlap={overlap}": _pipeline_step(gpt, chunks, transport, batches, overlap, NUM_MICROBATCHES)
                for overlap in (True, False)
            }
            return {"ep_ranks": ep_ranks, "replica": replica, "stage_rank": stage_rank,
                    **_compare_steps(ref, runs, params)}
        finally:
            destroy_parallel()


# ----------------------------------------------------------------------------------------------- tests

# F of layers 1-2 (with the chunk's prologue and epilogue) & B of layers 3-4, by start time: the engine's
# rule of dualpipe_plugin.runtime.overlap applied to Megatron's five sub-stages per layer. Each
# "comm" entry spans launch to wait, so e.g. F's L1.dispatch flies over B's L4.experts.
PAIR_ORDER = [
    "B:3:_Epilogue:compute", "B:L4.post:compute", "B:L4.combine:comm", "F:0:_Prologue:compute",
    "F:L1.attn:compute", "F:L1.dispatch:comm", "B:L4.experts:compute", "B:L4.dispatch:comm",
    "F:L1.experts:compute", "F:L1.combine:comm", "B:L4.attn:compute", "B:L3.post:compute", "B:L3.combine:comm",
    "F:L1.post:compute", "F:L2.attn:compute", "F:L2.dispatch:comm", "B:L3.experts:compute",
    "B:L3.dispatch:comm", "F:L2.experts:compute", "F:L2.combine:comm", "B:L3.attn:compute",
    "B:0:_Prologue:compute", "F:L2.post:compute", "F:3:_Epilogue:compute",
]


@pytest.fixture(scope="module", params=[2, 1], ids=["EP2", "EP1"])
def p1(request, megatron_core) -> list[dict]:
    """P=1 on 2 processes (EP=2) and on 1 (EP=1: the transfers are local no-ops)."""
    return run_local(run_p1, request.param, timeout_s=TIMEOUT_S)


@megatron_test
def test_staged_moe_layer_equals_megatron_layer(p1) -> None:
    for rank, report in enumerate(p1):
        layers = report["layers"]
        for kind in ("moe-top1", "moe-top2", "moe-shared"):
            moe = layers[kind]
            assert moe["kinds"] == [("L1.attn", "compute"), ("L1.dispatch", "comm"), ("L1.experts", "compute"),
                                    ("L1.combine", "comm"), ("L1.post", "compute")]
            assert moe["output"] and moe["input_grad"], f"rank {rank} {kind}"
            assert moe["grads"] > 0 and not moe["differing"], f"rank {rank} {kind}: {moe['differing']}"
        assert layers["moe-shared"]["shared_experts"] and not layers["moe-top2"]["shared_experts"]
        dense = layers["dense"]
        assert dense["kinds"] == [("L1.layer", "compute")]
        assert dense["output"] and dense["input_grad"] and dense["grads"] > 0 and not dense["differing"]
        assert "moe_token_dispatcher_type='alltoall'" in layers["allgather_refused"]
        assert layers["moe-top2"]["interleaved_forwards"], f"rank {rank}"
    if len(p1) == 2:
        # Rank 1's tokens are all alike: with top-1 they all go to one expert, so it sends nothing to one peer.
        assert 0 in p1[1]["layers"]["moe-top1"]["send_splits"]
        assert p1[0]["layers"]["moe-top2"]["send_splits"] != p1[1]["layers"]["moe-top2"]["send_splits"]


@megatron_test
def test_staged_gpt_chunk_equals_gpt_forward(p1) -> None:
    for rank, report in enumerate(p1):
        assert len(report["chunks"]) == 10
        for case in report["chunks"]:
            assert case["output"] and case["no_grad"] and case["same_params"], f"rank {rank} {case}"
            assert case["grads"] > 0 and not case["differing"], f"rank {rank} {case}"


@megatron_test
def test_overlapped_pair_equals_sequential_and_overlaps(p1) -> None:
    for rank, report in enumerate(p1):
        pair = report["pair"]
        for key in ("overlap_vs_sequential", "overlap_vs_plain"):
            result = pair[key]
            assert result["output"] and result["input_grad"] and not result["differing"], f"rank {rank} {key}"
        assert pair["overlap_vs_sequential"]["grads"] > 0
        assert pair["order"] == PAIR_ORDER, f"rank {rank}: {pair['order']}"
        assert not pair["sequential_overlaps"]
        if len(p1) == 2:  # real transfers: each side's all-to-alls fly while the other side computes
            assert pair["forward_comm_over_backward_compute"], f"rank {rank}: no F transfer overlapped B compute"
            assert pair["backward_comm_over_forward_compute"], f"rank {rank}: no B transfer overlapped F compute"


def _assert_step(report: dict, where: str, *, has_loss: bool = True) -> None:
    for name in ("overlap=True", "overlap=False"):
        run = report[name]
        assert bool(run["losses"]) == has_loss, f"{where} {name}: losses {run['losses']}"
        for g, (got, want) in run["losses"].items():
            assert got == want, f"{where} {name}: micro-batch {g} loss {got} != Megatron's {want}"
        assert run["grads"] > 0 and not run["differing"], f"{where} {name}: {run['differing']}"
    assert report["overlap=True"]["engine"] and report["overlap=True"]["pair_events"] > 0
    assert report["overlap=True"]["overlapped"] > 0  # some transfer spanned some compute of the other side
    assert not report["overlap=False"]["engine"]


@megatron_test
def test_dualpipe_p1_equals_megatron_schedule(p1) -> None:
    for rank, report in enumerate(p1):
        _assert_step(report["pipeline"], f"rank {rank}")


@megatron_test
def test_dualpipe_p2_ep2_equals_megatron_schedule() -> None:
    pytest.importorskip("megatron.core")
    reports = run_local(run_p2_ep2, 4, timeout_s=TIMEOUT_S)
    for rank, report in enumerate(reports):
        assert report["ep_ranks"] == [rank - rank % 2, rank - rank % 2 + 1], report["ep_ranks"]
        # dualpipev: the last stage (and the loss) is on rank 0 of each pipeline.
        _assert_step(report, f"rank {rank} (replica {report['replica']}, stage rank {report['stage_rank']})",
                     has_loss=report["stage_rank"] == 0)


def test_check_layer_refuses_other_modules(megatron_core) -> None:
    from torch import nn

    from dualpipe_plugin.megatron.moe_overlap import MegatronOverlapError, check_layer

    with pytest.raises(TypeError, match="expected a megatron.core TransformerLayer"):
        check_layer(nn.Linear(2, 2))
    assert issubclass(MegatronOverlapError, ValueError)
