"""Shared pieces of the runtime tests: a tiny model, a single-process reference, a spawned pipeline run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dualpipe_plugin.runtime.pipeline import DualPipeline, split_stages, stage_modules
from dualpipe_plugin.schedules import build_schedule


@dataclass(frozen=True)
class Case:
    schedule: str
    ranks: int
    microbatches: int
    layers_per_stage: int = 2
    dim: int = 16
    batch_per_microbatch: int = 3
    seed: int = 0
    steps: int = 1
    checkpoint: bool = False
    forward_only: bool = False
    vary_seq: bool = False
    options: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return build_schedule(self.schedule, self.ranks, 2 * self.ranks).placement.num_stages


class Block(nn.Module):
    """Linear + tanh (+ LayerNorm every other block, which does not split its weight gradients)."""

    def __init__(self, dim: int, norm: bool, checkpoint: bool):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.checkpoint = checkpoint

    def _body(self, x):
        return self.norm(torch.tanh(self.linear(x)))

    def forward(self, x):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._body, x, use_reentrant=True)
        return self._body(x)


def build_layers(case: Case) -> list[nn.Module]:
    torch.manual_seed(case.seed)
    count = case.num_stages * case.layers_per_stage
    return [Block(case.dim, norm=i % 2 == 1, checkpoint=case.checkpoint) for i in range(count)]


def batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    seq = 4 + (step % 3 if case.vary_seq else 0)
    n = case.microbatches * case.batch_per_microbatch
    x = torch.randn(n, seq, case.dim, generator=generator)
    y = torch.randn(n, seq, case.dim, generator=generator)
    return x, y


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def _flows(case: Case) -> list[range]:
    """Micro-batches accumulated separately: dualpipe's two directions land on different copies."""
    c = case.microbatches
    return [range(c // 2), range(c // 2, c)] if case.schedule == "dualpipe" else [range(c)]


def reference(case: Case) -> dict:
    """Losses and per-parameter gradients of one process running the whole model, micro-batch by micro-batch.

    The accumulation order matches the pipeline's (micro-batches in order per stage; dualpipe sums its
    two directions' gradients at the end), so fp32 results are comparable bit for bit.
    """
    layers = build_layers(case)
    model = nn.Sequential(*layers)
    stages = split_stages(layers, case.num_stages)
    names = {id(p): f"stage{s}.{i}" for s, part in enumerate(stages) for i, p in enumerate(nn.Sequential(*part).parameters())}
    losses, grads = [], []
    for step in range(case.steps):
        x, y = batch(case, step)
        xs, ys = x.chunk(case.microbatches), y.chunk(case.microbatches)
        flow_grads = []
        step_losses = []
        for flow in _flows(case):
            model.zero_grad(set_to_none=True)
            for g in flow:
                if case.forward_only:
                    with torch.no_grad():
                        loss = loss_fn(model(xs[g]), ys[g])
                else:
                    loss = loss_fn(model(xs[g]), ys[g])
                    (loss / case.microbatches).backward()
                step_losses.append(loss.detach())
            flow_grads.append({names[id(p)]: p.grad.clone() for p in model.parameters() if p.grad is not None})
        total = flow_grads[0]
        for extra in flow_grads[1:]:
            total = {k: total[k] + extra[k] for k in total}
        losses.append(step_losses)
        grads.append(total)
    return {"losses": losses, "grads": grads}


def run_pipeline(rank: int, world_size: int, case: Case) -> dict:
    """Body of one spawned rank: build this rank's chunks, run the steps, report losses and gradients."""
    layers = build_layers(case)
    chunks = stage_modules(layers, case.schedule, world_size, rank)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, **case.options)
    placement = pipe.placement
    losses, grads, peaks = [], [], []
    for step in range(case.steps):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        x, y = batch(case, step)
        result = pipe.step(
            x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
            num_microbatches=case.microbatches, forward_only=case.forward_only,
        )
        losses.append({g: v for g, v in result.losses.items()})
        peaks.append(result.peak_activations)
        named = {}
        for c, chunk in enumerate(chunks):
            stage = placement.stage(rank, c)
            for i, p in enumerate(chunk.parameters()):
                named[f"stage{stage}.{i}"] = None if p.grad is None else p.grad.clone()
        grads.append(named)
    pipe.close()
    return {"losses": losses, "grads": grads, "peaks": peaks, "total_loss": result.loss}
