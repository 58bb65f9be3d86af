"""Random numbers keyed by the micro-batch, not by the schedule: seeded dropout that every schedule repeats.

A layer drawing from a stream that advances with every call (a per-layer ``torch.Generator``, or the
global RNG) draws in the order its rank runs the micro-batches, which is the schedule's. Under DualPipe
it is worse: micro-batch m runs on one copy of a stage and micro-batch C/2+m on the other, whose own
generator starts over, so C/2+m gets m's dropout mask.

:class:`MicrobatchRNG` ties one layer's draws to (its seed, the global micro-batch index). The pipeline
tells every ``MicrobatchRNG`` in a chunk which micro-batch it runs before each forward and each backward
(a backward that recomputes a checkpointed forward draws the forward's mask again); one process running
the whole model says it with :func:`set_microbatch` before each micro-batch. Every schedule and the single
process then draw the same numbers, so losses and gradients match bit for bit::

    class Block(nn.Module):
        def __init__(self, index):
            super().__init__()
            self.linear = nn.Linear(64, 64)
            self.rng = MicrobatchRNG(seed=1000 + index)          # one seed per layer
        def forward(self, x):
            with self.rng.fork():                                 # the global RNG, seeded for this micro-batch
                return F.dropout(self.linear(x), p=0.1, training=self.training)

    for g in range(C):                                            # the single-process reference
        set_microbatch(model, g)
        (loss_fn(model(x[g]), y[g]) / C).backward()

A layer that needs two independent draws uses two ``MicrobatchRNG`` (two seeds), or draws both inside one
``fork()`` in a fixed order. It costs nothing when unused: the executor looks for ``MicrobatchRNG`` modules
once, when it is built. :func:`warn_private_generators` warns (under a mirrored schedule) about layers
that keep their own ``torch.Generator``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dualpipe_plugin.runtime.errors import PipelineConfigError

__all__ = [
    "MicrobatchRNG", "MirroredGeneratorWarning", "set_microbatch", "microbatch_rngs", "private_generators",
    "warn_private_generators",
]

_MASK64 = (1 << 64) - 1


class MirroredGeneratorWarning(UserWarning):
    """A layer keeps its own ``torch.Generator`` under a schedule that runs each stage as two copies."""


def _mix(seed: int, microbatch: int) -> int:
    """A 63-bit seed for (seed, microbatch) (splitmix64's finaliser: neighbouring inputs give unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + microbatch + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class MicrobatchRNG(nn.Module):
    """The random numbers of one layer: a function of ``seed`` and the global micro-batch being computed.

    A module (with no parameters or buffers, so checkpoints do not change) so that the pipeline finds it
    inside a chunk. ``microbatch`` is set by the pipeline, or by :func:`set_microbatch` in one process.
    """

    def __init__(self, seed: int):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PipelineConfigError(f"MicrobatchRNG(seed=...) must be an integer >= 0, got {seed!r}; give each "
                                      f"layer its own, e.g. base_seed + layer_index")
        self.seed = seed
        self.microbatch = 0

    def extra_repr(self) -> str:
        return f"seed={self.seed}"

    def seed_now(self) -> int:
        """The seed of the current micro-batch's draws."""
        return _mix(self.seed, self.microbatch)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A new generator on ``device`` seeded for the current micro-batch (draws from it in a fixed order)."""
        return torch.Generator(device=device).manual_seed(self.seed_now())

    @contextmanager
    def fork(self) -> Iterator[None]:
        """Seed the global RNG (CPU, and the current CUDA device if CUDA is in use) for the current
        micro-batch inside the block, and restore its state afterwards: plain ``nn.Dropout`` inside draws
        the micro-batch's mask."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(self.seed_now())
            if devices:
                torch.cuda.manual_seed(self.seed_now())
            yield


def microbatch_rngs(module: nn.Module) -> list[MicrobatchRNG]:
    """Every :class:`MicrobatchRNG` inside ``module``."""
    return [m for m in module.modules() if isinstance(m, MicrobatchRNG)]


def set_microbatch(module: nn.Module, microbatch: int) -> None:
    """Tell every :class:`MicrobatchRNG` inside ``module`` that ``microbatch`` (its global index) runs next."""
    for rng in microbatch_rngs(module):
        rng.microbatch = microbatch


def private_generators(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` that keep a ``torch.Generator`` as an attribute."""
    return [name or type(sub).__name__ for name, sub in module.named_modules()
            if any(isinstance(value, torch.Generator) for value in vars(sub).values())]


def warn_private_generators(chunks: list[nn.Module], schedule: str) -> None:
    """Warn (:class:`MirroredGeneratorWarning`) if a chunk of mirrored ``schedule`` keeps its own generator."""
    for index, chunk in enumerate(chunks):
        names = private_generators(chunk)
        if names:
            warnings.warn(
                f"chunk {index} module(s) {', '.join(names)} keep their own torch.Generator: {schedule} runs each "
                f"stage as two copies, one per direction, so such a generator hands micro-batch C/2+m the draws of "
                f"micro-batch m; draw from dualpipe_plugin.runtime.MicrobatchRNG(seed) instead (its draws follow "
                f"the global micro-batch)",
                MirroredGeneratorWarning,
                stacklevel=4,
            )
            return
