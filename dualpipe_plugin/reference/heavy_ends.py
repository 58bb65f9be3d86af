"""A model whose ends are heavy: a large-vocabulary embedding, small blocks, a large-vocabulary head.

The shape where uniform cuts go wrong: the stages holding the embedding and the LM head (both on rank 0
in a V) do far more than the others, so the planner's cuts move blocks off them. One row of layers
(``output = layer(input)``, as :func:`~dualpipe_plugin.runtime.pipeline.stage_modules` and the profiler
take them), real math: token embedding, pre-norm MLP blocks with a residual, norm + vocabulary
projection. Its emulated twin (the same shape in emulated time, for timing on a CPU box) is
:func:`dualpipe_plugin.bench.planned.emulated_heavy_ends`; ``dualpipe-plugin profile --model
dualpipe_plugin.planner.targets:heavy_ends`` profiles this one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HeavyEnds", "heavy_ends_layers", "lm_loss", "batch"]


@dataclass(frozen=True, kw_only=True, slots=True)
class HeavyEnds:
    """Sizes of the real-math model (defaults: a few MB, fast on CPU)."""

    vocab: int = 4096
    dim: int = 64
    ffn: int = 128
    blocks: int = 6
    rows: int = 4
    """Sequences per micro-batch."""
    seq: int = 16
    seed: int = 0


def heavy_ends_layers(config: HeavyEnds = HeavyEnds()) -> list:
    """``[embedding, block x blocks, head]``, weights from ``config.seed`` (the same on every rank)."""
    import torch
    from torch import nn

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(config.vocab, config.dim)

        def forward(self, tokens):  # [rows, seq] -> [rows, seq, dim]
            return self.table(tokens)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(config.dim)
            self.up = nn.Linear(config.dim, config.ffn)
            self.down = nn.Linear(config.ffn, config.dim)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(config.dim)
            self.out = nn.Linear(config.dim, config.vocab)

        def forward(self, x):  # -> logits [rows, seq, vocab]
            return self.out(self.norm(x))

    state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        return [Embedding()] + [Block() for _ in range(config.blocks)] + [Head()]
    finally:
        torch.random.set_rng_state(state)


def lm_loss(logits, labels):
    import torch

    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def batch(config: HeavyEnds, microbatches: int, seed: int = 1):
    """(tokens, labels) of a step: ``microbatches * rows`` sequences."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (microbatches * config.rows, config.seq)
    return (torch.randint(0, config.vocab, shape, generator=generator),
            torch.randint(0, config.vocab, shape, generator=generator))
