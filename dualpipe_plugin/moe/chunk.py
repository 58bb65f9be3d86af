"""Pipeline chunks of the reference MoE model: embedding + blocks + head, cut into pipeline stages.

>>> ep = new_expert_parallel([[p, P + p] for p in range(P)])            # every process, same list
>>> layers = moe_layers(config, num_blocks=8, ep=ep, seed=0)            # same call on every rank
>>> chunks = moe_chunks(layers, "dualpipev", num_ranks=P, rank=r)        # this rank's StagedChunks
>>> pipe = DualPipeline(chunks, "dualpipev", loss_fn=lm_loss, transport=transport)

Stage s of S holds blocks ``[s·n/S, (s+1)·n/S)``; stage 0 also the embedding, stage S-1 also the head.
Every rank builds the whole model from the same seed (so the model does not depend on P or EP) and
keeps its stages; the blocks keep only their EP rank's experts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from dualpipe_plugin.moe.block import MoEBlock
from dualpipe_plugin.moe.config import MoEConfig, MoEConfigError
from dualpipe_plugin.moe.dispatcher import ExpertParallel
from dualpipe_plugin.runtime.staged import StagedChunk
from dualpipe_plugin.schedules import build_schedule

__all__ = ["Embedding", "Head", "MoEModel", "moe_layers", "moe_chunks", "lm_loss"]


class Embedding(nn.Module):
    """Token ids [b, s] -> hidden states [b, s, d]."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.table = nn.Embedding(config.vocab_size, config.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


class Head(nn.Module):
    """Hidden states [b, s, d] -> logits [b, s, vocab]."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(h))


class MoEModel(nn.Module):
    """The whole model as a list of layers: ``[Embedding, MoEBlock × n, Head]``."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def blocks(self) -> list[MoEBlock]:
        return [layer for layer in self.layers if isinstance(layer, MoEBlock)]


def moe_layers(config: MoEConfig, num_blocks: int, *, ep: ExpertParallel | None = None, seed: int = 0) -> MoEModel:
    """The whole model, initialised from ``seed`` (identical on every rank), experts sliced to this EP rank
    (``ep`` from :func:`~dualpipe_plugin.moe.dispatcher.new_expert_parallel`; None: every expert here)."""
    if num_blocks < 1:
        raise MoEConfigError(f"num_blocks must be >= 1, got {num_blocks}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers = [Embedding(config)] + [MoEBlock(config, ep) for _ in range(num_blocks)] + [Head(config)]
    finally:
        torch.random.set_rng_state(generator_state)
    return MoEModel(layers)


def moe_chunks(
    model: MoEModel, schedule: str, num_ranks: int, rank: int, *, wrap: Callable[[nn.Module], nn.Module] | None = None
) -> list[StagedChunk]:
    """This rank's chunks (in the schedule's chunk order) of ``model``, one StagedChunk per stage.

    ``wrap`` maps each block to the part put in the chunk (the overlap benchmark adds emulated compute).
    """
    placement = build_schedule(schedule, num_ranks, 2 * num_ranks).placement
    blocks, stages = model.blocks, placement.num_stages
    if len(blocks) < stages:
        raise MoEConfigError(
            f"{schedule} with {num_ranks} ranks has {stages} stages but the model has {len(blocks)} blocks; "
            f"build at least one block per stage (num_blocks >= {stages})"
        )
    chunks = []
    for chunk in range(placement.num_chunks):
        stage = placement.stage(rank, chunk)
        parts: list[nn.Module] = [model.layers[0]] if stage == 0 else []
        mine = blocks[stage * len(blocks) // stages : (stage + 1) * len(blocks) // stages]
        parts += [wrap(block) for block in mine] if wrap else mine
        parts += [model.layers[-1]] if stage == stages - 1 else []
        chunks.append(StagedChunk(parts))
    return chunks


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over all positions (labels are the targets, already shifted)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
