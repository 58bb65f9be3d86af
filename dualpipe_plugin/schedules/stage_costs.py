"""Measured costs per pipeline stage: what the simulator uses once a model has been profiled.

Where :class:`~dualpipe_plugin.schedules.costs.CostModel` gives one F, B and W for every chunk, a
:class:`StageCostModel` gives each stage its own (the stage holding the embedding is not the one holding
the LM head), charges every compute action the runtime's own overhead, and times every transfer between
two ranks as ``latency + bytes / bandwidth`` with the bytes of the activation crossing that stage
boundary (its gradient, going back, has the same size)::

    >>> costs = StageCostModel(
    ...     stages=(StageCost(F=3, I=3, W=2), StageCost(F=2, I=2, W=2)),
    ...     boundary_bytes=(1 << 20,), link=Link(latency=0.4, bytes_per_ms=1e6), overhead=0.3)
    >>> round(costs.transfer_cost(("F", 0, 0, 5)), 4)           # 0.4 ms + 1 MiB at 1 GB/s
    1.4486

Times are in milliseconds (the unit of the profile file and of every picture), sizes in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dualpipe_plugin.schedules.errors import CostModelError
from dualpipe_plugin.schedules.ir import Action, OpKind, Pair

__all__ = ["Link", "StageCost", "StageCostModel"]


def _check(owner: str, **values: float | None) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CostModelError(f"{owner} {key}={value!r} is not a finite number")
        if value < 0:
            raise CostModelError(f"{owner} {key}={value} is negative; every cost must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One point-to-point hop between two pipeline ranks: ``latency + bytes / bytes_per_ms``."""

    latency: float = 0.0
    """Milliseconds from the producer's end to the consumer's start for an empty message."""
    bytes_per_ms: float | None = None
    """Bandwidth in bytes per millisecond (1 GB/s = 1e6); None: bytes cost nothing."""

    def __post_init__(self) -> None:
        _check("link", latency=self.latency, bytes_per_ms=self.bytes_per_ms)
        if self.bytes_per_ms == 0:
            raise CostModelError("link bandwidth is 0 bytes/ms, so no transfer would ever arrive; give a "
                                 "positive bandwidth or leave it out (None) for free bytes")

    def time(self, nbytes: float) -> float:
        return self.latency + (nbytes / self.bytes_per_ms if self.bytes_per_ms else 0.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class StageCost:
    """One stage's op durations (ms) for one micro-batch."""

    F: float
    """Forward."""
    I: float  # noqa: E741 - the name the zero-bubble literature uses
    """Input-gradient part of the backward (an ``I`` op; its weight gradients wait for ``W``)."""
    W: float
    """Weight-gradient part (a ``W`` op)."""
    B: float | None = None
    """Full backward in one op; defaults to I + W."""

    def __post_init__(self) -> None:
        _check("stage cost", F=self.F, I=self.I, W=self.W, B=self.B)

    @property
    def backward(self) -> float:
        return self.I + self.W if self.B is None else self.B


@dataclass(frozen=True, kw_only=True, slots=True)
class StageCostModel:
    """Per-stage costs, the link between ranks and the runtime's per-action overhead."""

    stages: tuple[StageCost, ...]
    """One entry per pipeline stage (stage 0 holds the model's input side)."""
    boundary_bytes: tuple[float, ...] = ()
    """Bytes of the activation stage s sends to stage s+1 (one entry per boundary, S-1 in all; empty:
    every transfer carries 0 bytes)."""
    link: Link = Link()
    overhead: float = 0.0
    """Added to every compute action: what the runtime spends around an op (launching its transfers,
    bookkeeping) beyond the layers' own time, as measured by the profiler."""
    pair_factor: float = 1.0
    """An overlapped F&B pair lasts ``pair_factor * (F + B)``: 1 when the pair runs one after the other,
    below 1 when its communication hides behind the other half's compute. A pair that runs one half after
    the other is timed half by half (:meth:`forward_half`), as the runtime runs it; an overlapped one as
    one action."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise CostModelError("a StageCostModel needs at least one stage")
        if self.boundary_bytes and len(self.boundary_bytes) != len(self.stages) - 1:
            raise CostModelError(
                f"{len(self.stages)} stages have {len(self.stages) - 1} boundaries, got "
                f"{len(self.boundary_bytes)} boundary_bytes; give one entry per boundary (or none)"
            )
        _check("boundary", **{f"bytes[{i}]": value for i, value in enumerate(self.boundary_bytes)})
        _check("stage cost model", overhead=self.overhead, pair_factor=self.pair_factor)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _stage(self, stage: int) -> StageCost:
        if stage >= len(self.stages):
            raise CostModelError(
                f"the cost model has {len(self.stages)} stages but the schedule has a stage {stage}; profile "
                f"or cut the model into as many stages as the schedule places"
            )
        return self.stages[stage]

    def op_cost(self, kind: OpKind, stage: int) -> float:
        cost = self._stage(stage)
        return {OpKind.F: cost.F, OpKind.B: cost.backward, OpKind.I: cost.I, OpKind.W: cost.W}[kind]

    def action_cost(self, action: Action, stages: tuple[int, ...]) -> float:
        if isinstance(action, Pair):
            pair = self.op_cost(OpKind.F, stages[0]) + self.op_cost(OpKind.B, stages[1])
            return self.pair_factor * pair + self.overhead
        return self.op_cost(action.kind, stages[0]) + self.overhead

    def forward_half(self, action: Action, stages: tuple[int, ...]) -> float | None:
        """For an F&B pair that runs one half after the other (``pair_factor`` 1), its forward half's duration:
        as in the runtime, the forward starts once its inputs are in and hands its outputs on when it ends,
        and the backward half starts after it once its gradients are in. None for any other action, and for
        an overlapped pair, whose halves interleave: one action, its outputs out at its end."""
        if isinstance(action, Pair) and self.pair_factor == 1.0:
            return self.op_cost(OpKind.F, stages[0])
        return None

    def boundary_time(self, boundary: int) -> float:
        """One hop across the boundary between stage ``boundary`` and ``boundary + 1``."""
        nbytes = self.boundary_bytes[boundary] if self.boundary_bytes else 0.0
        return self.link.time(nbytes)

    def transfer_cost(self, event: tuple) -> float:
        what, _, stage, _ = event
        # F: the output of ``stage`` going forward; G: the gradient of ``stage``'s input going back. Other
        # events (a backward's own forward, a W's own I) never leave their rank, nor do the model's ends.
        boundary = stage if what == "F" else stage - 1 if what == "G" else -1
        if not 0 <= boundary < len(self.stages) - 1:
            return 0.0
        return self.boundary_time(boundary)
