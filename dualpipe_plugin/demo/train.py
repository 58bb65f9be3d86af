"""The demo's training run: the reference MoE transformer on P pipeline ranks x EP expert-parallel
replicas of local gloo processes, trained on the generated corpus with the standalone runtime.

World layout: replica e owns the pipeline of global ranks ``[e·P, (e+1)·P)``; the ranks at the same
pipeline stage form that stage's expert-parallel group, which is also its data-parallel group. Shared
(non-expert) gradients are averaged over it; an expert's gradient already holds every replica's tokens
and is divided by EP, so the update is that of the mean loss over replicas.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from dualpipe_plugin.demo.corpus import ALPHABET, CorpusBatches
from dualpipe_plugin.moe import MoEConfig, lm_loss, moe_chunks, moe_layers, new_expert_parallel
from dualpipe_plugin.runtime import DualPipeline, TorchTransport, new_pipeline_groups

__all__ = ["DemoConfig", "train_rank"]


@dataclass(frozen=True)
class DemoConfig:
    schedule: str = "dualpipev"
    ranks: int = 4
    ep: int = 1
    microbatches: int = 8
    steps: int = 40
    blocks: int = 8
    dim: int = 48
    heads: int = 4
    experts: int = 4
    top_k: int = 2
    seq_len: int = 32
    batch_per_microbatch: int = 4
    lr: float = 3e-3
    overlap: bool = True
    seed: int = 0

    @property
    def world(self) -> int:
        return self.ranks * self.ep

    def moe(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, heads=self.heads, num_experts=self.experts, top_k=self.top_k,
                         ffn_dim=2 * self.dim, vocab_size=len(ALPHABET))


def _average_over_replicas(params: list[torch.nn.Parameter], expert_ids: set[int], group, size: int) -> None:
    for param in params:
        if param.grad is None:
            continue
        if id(param) not in expert_ids:
            dist.all_reduce(param.grad, group=group)
        param.grad.div_(size)


def train_rank(rank: int, world: int, config: DemoConfig) -> dict:
    """Body of one spawned process; returns losses, step times and (rank 0 of each stage) the timeline."""
    P, replica = config.ranks, rank // config.ranks
    pipelines = [list(range(e * P, (e + 1) * P)) for e in range(config.ep)]
    transport = TorchTransport(pipelines[replica], new_pipeline_groups(pipelines)[replica])
    ep = new_expert_parallel([[e * P + p for e in range(config.ep)] for p in range(P)]) if config.ep > 1 else None
    model = moe_layers(config.moe(), config.blocks, ep=ep, seed=config.seed)
    chunks = moe_chunks(model, config.schedule, P, transport.rank)
    pipe = DualPipeline(chunks, config.schedule, loss_fn=lm_loss, transport=transport, overlap=config.overlap)
    params = list({id(p): p for chunk in chunks for p in chunk.parameters()}.values())
    expert_ids = {id(p) for chunk in chunks for name, p in chunk.named_parameters() if ".experts." in name}
    optimizer = torch.optim.Adam(params, lr=config.lr)
    data = CorpusBatches(config.seq_len, config.microbatches * config.batch_per_microbatch, seed=config.seed)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc=f"{config.schedule} P={P} EP={config.ep}", file=sys.stderr, unit="step")
    losses, step_ms, timeline, peak = [], [], [], 0
    for step in range(config.steps):
        tokens, labels = data.get(step, replica)
        last = step == config.steps - 1
        started = time.perf_counter()
        result = pipe.step(
            tokens if pipe.needs_inputs() else None, labels if pipe.needs_labels() else None,
            num_microbatches=config.microbatches, record=last,
        )
        if config.ep > 1:
            _average_over_replicas(params, expert_ids, ep.group, config.ep)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_ms.append((time.perf_counter() - started) * 1e3)
        loss = result.loss.clone()
        if config.ep > 1:
            dist.all_reduce(loss, group=ep.group)
            loss /= config.ep
        losses.append(float(loss))
        if last:
            timeline, peak = result.timeline, result.peak_activations
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", step_ms=f"{step_ms[-1]:.0f}")
            bar.update()
    if bar is not None:
        bar.close()
    pipe.close()
    return {"losses": losses, "step_ms": step_ms, "timeline": timeline, "peak": peak,
            "pipeline_rank": transport.rank, "replica": replica, "config": asdict(config)}
