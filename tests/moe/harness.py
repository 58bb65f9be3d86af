"""Shared pieces of the MoE tests: data, a dense single-process reference, spawned pipeline runs.

Process layout of a case with P stages × EP replicas (world = P·EP): replica e is the pipeline of world
ranks ``[e·P, (e+1)·P)``; the expert-parallel group of stage p is ``{p, P+p, 2P+p, ...}`` (the ranks at
the same stage in different replicas). Replica e trains on its own data (data parallel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dualpipe_plugin.moe import MoEConfig, lm_loss, moe_chunks, moe_layers, new_expert_parallel
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.runtime.staged import StagedChunk
from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups

CONFIG = MoEConfig(dim=16, heads=2, num_experts=8, top_k=2, ffn_dim=24, vocab_size=32)


@dataclass(frozen=True)
class MoECase:
    ranks: int
    ep: int
    microbatches: int
    blocks: int
    schedule: str = "dualpipev"
    batch: int = 2
    seq: int = 3
    seed: int = 0
    config: MoEConfig = field(default=CONFIG)

    @property
    def world(self) -> int:
        return self.ranks * self.ep

    def pipelines(self) -> list[list[int]]:
        return [[e * self.ranks + p for p in range(self.ranks)] for e in range(self.ep)]

    def ep_groups(self) -> list[list[int]]:
        return [[e * self.ranks + p for e in range(self.ep)] for p in range(self.ranks)]


def data(case: MoECase, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels [C·batch, seq] of one replica. Micro-batch 1 repeats one token everywhere, so all
    its tokens take the same two experts and the others get none (zero-token experts, a one-sided EP load)."""
    generator = torch.Generator().manual_seed(100 * case.seed + replica)
    n = case.microbatches * case.batch
    tokens = torch.randint(0, case.config.vocab_size, (n, case.seq), generator=generator)
    labels = torch.randint(0, case.config.vocab_size, (n, case.seq), generator=generator)
    tokens[case.batch : 2 * case.batch] = 3 + replica
    return tokens, labels


def global_names(model) -> dict[int, str]:
    """Parameter id -> name with the expert's *global* index (``experts.experts.<local>`` -> ``experts.<e>``)."""
    names = {}
    for name, param in model.named_parameters():
        match = re.match(r"layers\.(\d+)\.experts\.experts\.(\d+)\.(.*)", name)
        if match:
            block = model.layers[int(match.group(1))]
            name = f"layers.{match.group(1)}.experts.{block.experts.first + int(match.group(2))}.{match.group(3)}"
        names[id(param)] = name
    return names


def grads_of(model, params) -> dict[str, torch.Tensor | None]:
    names = global_names(model)
    return {names[id(p)]: None if p.grad is None else p.grad.clone() for p in params}


def _groups(case: MoECase):
    """(this rank's replica, its transport, its EP group) - every process creates every group."""
    me = dist.get_rank()
    pipelines = case.pipelines()
    pipe_groups = new_pipeline_groups(pipelines)
    ep = new_expert_parallel(case.ep_groups())
    replica = me // case.ranks
    stage_rank = me % case.ranks
    transport = TorchTransport(pipelines[replica], groups=pipe_groups[replica])
    return replica, stage_rank, transport, ep


def run_case(rank: int, case: MoECase) -> dict:
    """On one process: the pipeline with overlap on and off, and (pipeline rank 0) the P=1 × EP reference."""
    replica, stage_rank, transport, ep = _groups(case)
    tokens, labels = data(case, replica)
    report = {"replica": replica, "stage_rank": stage_rank}
    for overlap in (True, False):
        model = moe_layers(case.config, case.blocks, ep=ep, seed=case.seed)
        chunks = moe_chunks(model, case.schedule, case.ranks, stage_rank)
        pipe = DualPipeline(chunks, case.schedule, loss_fn=lm_loss, transport=transport, overlap=overlap)
        trace = []
        if pipe.executor.overlap is not None:
            pipe.executor.overlap.trace = trace
        result = pipe.step(
            tokens if pipe.needs_inputs() else None, labels if pipe.needs_labels() else None,
            num_microbatches=case.microbatches,
        )
        pipe.close()
        params = [p for chunk in chunks for p in chunk.parameters()]
        report["on" if overlap else "off"] = {
            "losses": dict(result.losses), "grads": grads_of(model, params), "loss": result.loss,
            "pair_events": len(trace), "engine": pipe.executor.overlap is not None,
        }
    if stage_rank == 0:
        report["reference"] = reference_run(case, tokens, labels, ep)
    return report


def reference_run(case: MoECase, tokens, labels, ep) -> dict:
    """The whole model on this replica's data, micro-batch after micro-batch, experts over ``ep``
    (no pipeline): the same EP semantics as the pipeline, in the pipeline's accumulation order."""
    model = moe_layers(case.config, case.blocks, ep=ep, seed=case.seed)
    whole = StagedChunk(list(model.layers))
    xs, ys = tokens.chunk(case.microbatches), labels.chunk(case.microbatches)
    losses, total = {}, None
    for flow in _flows(case):
        model.zero_grad(set_to_none=True)
        for g in flow:
            loss = lm_loss(whole(xs[g]), ys[g])
            (loss / case.microbatches).backward()
            losses[g] = loss.detach()
        grads = grads_of(model, list(model.parameters()))
        total = grads if total is None else {k: _add(total[k], grads[k]) for k in total}
    return {"losses": losses, "grads": total}


def _flows(case: MoECase) -> list[range]:
    """Micro-batches accumulated separately: dualpipe's two directions land on mirrored copies, whose
    gradients its mirror sync adds at the end of the step."""
    c = case.microbatches
    return [range(c // 2), range(c // 2, c)] if case.schedule == "dualpipe" else [range(c)]


def _add(a, b):
    return b if a is None else a if b is None else a + b


def run_cases(rank: int, world: int, cases: list[MoECase]) -> list[dict]:
    return [run_case(rank, case) for case in cases]


# -- the dense single-process reference ----------------------------------------------------------------
def dense_forward(model, tokens: torch.Tensor, routing: list | None = None) -> torch.Tensor:
    """The model's math written densely (every token through its k experts, no dispatch): an independent
    check of the sub-staged blocks. ``model`` must hold every expert (built with no EP group)."""
    h = model.layers[0](tokens)
    for block in model.blocks:
        a = h + block.attention(block.norm1(h))
        x = block.norm2(a).reshape(-1, block.config.dim)
        weights, experts = block.router(x)
        if routing is not None:
            routing.append(torch.bincount(experts.reshape(-1), minlength=block.config.num_experts))
        moe = torch.zeros_like(x)
        for e, expert in enumerate(block.experts.experts):
            for slot in range(experts.shape[1]):
                rows = (experts[:, slot] == e).nonzero().squeeze(1)
                if rows.numel():
                    moe = moe.index_add(0, rows, expert(x[rows]) * weights[rows, slot : slot + 1])
        h = a + moe.view_as(a)
    return model.layers[-1](h)


def dense_reference(case: MoECase) -> dict:
    """Per replica: losses and gradients of the dense model on that replica's data; expert gradients
    summed over replicas (each expert sees every replica's tokens), the others kept per replica."""
    per_replica, routing = [], []
    for replica in range(case.ep):
        model = moe_layers(case.config, case.blocks, seed=case.seed)
        tokens, labels = data(case, replica)
        losses = {}
        for g, (x, y) in enumerate(zip(tokens.chunk(case.microbatches), labels.chunk(case.microbatches))):
            loss = lm_loss(dense_forward(model, x, routing), y)
            (loss / case.microbatches).backward()
            losses[g] = loss.detach()
        per_replica.append({"losses": losses, "grads": grads_of(model, list(model.parameters()))})
    return {"replicas": per_replica, "routing": routing}


def is_expert(name: str) -> bool:
    return ".experts." in name
