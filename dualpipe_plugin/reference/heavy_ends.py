"""A model whose ends are heavy: a large-vocabulary embedding, small blocks, a large-vocabulary head.

The shape where uniform cuts go wrong: the stages holding the embedding and the LM head (both on rank 0
in a V) do far more than the others, so the planner's cuts move blocks off them. Two forms, one layer
row each (``output = layer(input)``, as :func:`~dualpipe_plugin.runtime.pipeline.stage_modules` and the
profiler take them):

* :func:`heavy_ends_layers`: real math (token embedding, pre-norm MLP blocks with a residual, norm +
  vocabulary projection), for memory, where real tensors matter;
* :func:`emulated_heavy_ends`: the emulated device (:mod:`dualpipe_plugin.runtime.emulate`): every layer
  is a small Linear+tanh that lasts a fixed F, I and W, the two ends ``end_factor`` times a block, for
  timing on a CPU box where real math on 4 ranks would fight for 2 cores.

``profile_target`` / ``emulated_profile_target`` are what ``dualpipe-plugin profile --model`` calls::

    dualpipe-plugin profile --model dualpipe_plugin.reference.heavy_ends:profile_target --out costs.json
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HeavyEnds", "heavy_ends_layers", "lm_loss", "batch", "profile_target", "EmulatedHeavyEnds",
    "emulated_heavy_ends", "emulated_profile_target", "mse_loss",
]


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


def profile_target(config: HeavyEnds = HeavyEnds()):
    """The real-math model as a :class:`~dualpipe_plugin.planner.profile.ProfileTarget` (one micro-batch)."""
    from functools import partial

    from dualpipe_plugin.planner.profile import ProfileTarget

    tokens, labels = batch(config, 1)
    return ProfileTarget.from_layers(heavy_ends_layers(config), tokens, loss=partial(_loss_on, labels),
                                     model=f"heavy-ends model (vocab {config.vocab}, {config.blocks} blocks)")


def _loss_on(labels, logits):
    return lm_loss(logits, labels)


# ------------------------------------------------------------------------------------------ emulated


@dataclass(frozen=True, kw_only=True, slots=True)
class EmulatedHeavyEnds:
    """The emulated twin: per block F, I, W in ms; the embedding and the head ``end_factor`` times that."""

    blocks: int = 14
    forward_ms: float = 4.0
    input_grad_ms: float = 4.0
    weight_grad_ms: float = 4.0
    end_factor: float = 3.0
    dim: int = 64
    rows: int = 8


def emulated_heavy_ends(config: EmulatedHeavyEnds = EmulatedHeavyEnds()) -> list:
    """``blocks + 2`` emulated layers (seed 0): heavy, ``blocks`` light, heavy."""
    import torch

    from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer

    light = EmulatedCosts(config.forward_ms / 1e3, config.input_grad_ms / 1e3, config.weight_grad_ms / 1e3)
    heavy = EmulatedCosts(light.forward_s * config.end_factor, light.input_grad_s * config.end_factor,
                          light.weight_grad_s * config.end_factor)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return ([EmulatedLayer(config.dim, heavy)] + [EmulatedLayer(config.dim, light) for _ in range(config.blocks)]
                + [EmulatedLayer(config.dim, heavy)])
    finally:
        torch.random.set_rng_state(state)


def mse_loss(output, target):
    return (output - target).pow(2).mean()


def emulated_profile_target(config: EmulatedHeavyEnds = EmulatedHeavyEnds()):
    import torch
    from functools import partial

    from dualpipe_plugin.planner.profile import ProfileTarget

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(config.rows, config.dim, generator=generator)
    target = torch.randn(config.rows, config.dim, generator=generator)
    return ProfileTarget.from_layers(emulated_heavy_ends(config), inputs, loss=partial(mse_loss, target=target),
                                     model=f"emulated heavy-ends model ({config.blocks} blocks, ends x{config.end_factor:g})")
