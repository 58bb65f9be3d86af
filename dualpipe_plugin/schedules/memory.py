"""Peak memory per rank in bytes: parameters, gradients, optimizer state, live activations, receive buffers.

What a rank holds at its peak, for a schedule and measured per-stage sizes (:class:`StageMemory`):

* parameters and gradients of every stage it holds (DualPipe: two stages, both kept);
* optimizer state: whole with ZeRO-0, divided by the data-parallel size with ZeRO-1 (DeepSpeed) or
  Megatron's distributed optimizer (:class:`OptimizerSharding`);
* live activations, walked op by op in the rank's order: a forward adds its stage's ``activation``
  (what autograd saves for one micro-batch); a full ``B`` releases it; an ``I`` releases it but keeps
  ``w_store`` (what the deferred weight gradients still hold: the split layers' inputs and output
  gradients) until the matching ``W``. In an F&B pair the forward is counted before the backward
  releases, as an interleaved pair holds both;
* receive buffers: the executor posts the receives of the next action while the current one runs, so
  at most one action's received tensors (input activations and output gradients) wait beside what is
  held; the largest such action of the rank is counted.

>>> from dualpipe_plugin.schedules import build_schedule
>>> stages = [StageMemory(params=100, grads=100, optimizer=200, activation=10)] * 4
>>> [m.activations for m in estimate_memory(build_schedule("1f1b", 4, 8), stages)]
[40, 30, 20, 10]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from dualpipe_plugin.schedules.errors import CostModelError
from dualpipe_plugin.schedules.ir import OpKind, Schedule
from dualpipe_plugin.schedules.lowering import Payload, op_io

__all__ = ["StageMemory", "OptimizerSharding", "RankMemory", "MemoryLayout", "estimate_memory"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StageMemory:
    """Bytes one pipeline stage holds (per copy of the stage)."""

    params: float = 0
    grads: float = 0
    optimizer: float = 0
    """Optimizer state of the stage's parameters, unsharded (e.g. Adam's two moments)."""
    activation: float = 0
    """Held per micro-batch from its forward until its backward (B or I)."""
    w_store: float = 0
    """Held per micro-batch from its I until its W (the deferred weight gradients' inputs)."""
    saves_input: float = 0
    """Of ``activation``, the bytes of the stage's own input."""
    saves_output: float = 0
    """Of ``activation``, the bytes of the stage's own output. Where a stage hands its output to the next
    on the same rank (the bottom of a V) both save one tensor: the receiving stage's share is not counted
    again."""

    def __post_init__(self) -> None:
        for key in ("params", "grads", "optimizer", "activation", "w_store", "saves_input", "saves_output"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CostModelError(f"stage memory {key}={value!r} must be a finite number of bytes >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSharding:
    """How the optimizer state is spread over the data-parallel replicas of a stage."""

    data_parallel: int = 1
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (every replica holds it all) or 1 (each holds 1/data_parallel). Stages 2
    and 3 partition gradients, which pipeline parallelism does not support."""
    distributed_optimizer: bool = False
    """Megatron's distributed optimizer: the state (and fp32 main weights) split over data parallel."""

    def __post_init__(self) -> None:
        if isinstance(self.data_parallel, bool) or not isinstance(self.data_parallel, int) or self.data_parallel < 1:
            raise CostModelError(f"data_parallel must be a whole number >= 1, got {self.data_parallel!r}")
        if self.zero_stage not in (0, 1):
            raise CostModelError(
                f"zero_stage={self.zero_stage!r}: pipeline parallelism runs with ZeRO stage 0 or 1 (stages 2 and 3 "
                f"partition gradients, which DeepSpeed refuses with pipelines); use 0 or 1"
            )

    @property
    def optimizer_share(self) -> float:
        """The fraction of a stage's optimizer state one replica holds."""
        sharded = self.zero_stage == 1 or self.distributed_optimizer
        return 1.0 / self.data_parallel if sharded else 1.0


@dataclass(frozen=True, slots=True)
class RankMemory:
    """One rank's estimated peak, by kind (bytes)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    """Peak of live activations and deferred-W inputs over the step."""
    comm_buffers: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.comm_buffers

    def to_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "comm_buffers": self.comm_buffers, "total": self.total}


class MemoryLayout:
    """What a schedule fixes about memory, whatever the sizes: per rank, its stages, how many micro-batches
    of each are live at every op boundary, and which boundaries each action receives across.

    A rank's live bytes after an op are ``sum over its chunks of a * activation + w * w_store`` for the
    counts (a, w) then; the peak is the largest such sum. Only count vectors no other vector of the rank
    dominates can be the peak, so :meth:`peak_activations` looks at a handful of them: a cut search asks
    for thousands of peaks per schedule.
    """

    def __init__(self, schedule: Schedule):
        placement = schedule.placement
        self.stages: list[tuple[int, ...]] = []
        self._vectors: list[list[tuple[int, ...]]] = []
        self._receives: list[list[tuple[int, ...]]] = []
        self.local_inputs: list[tuple[bool, ...]] = []
        """Per rank and chunk: its input comes from the same rank (no copy: the tensor is shared)."""
        for rank in range(schedule.num_ranks):
            chunks = [c for c in range(placement.num_chunks) if placement.holds(rank, c)]
            index = {chunk: i for i, chunk in enumerate(chunks)}
            self.stages.append(tuple(placement.stage(rank, c) for c in chunks))
            self.local_inputs.append(tuple(
                placement.prev_hop(rank, c) is not None and placement.prev_hop(rank, c)[0] == rank for c in chunks))
            live = [0] * (2 * len(chunks))  # (a, w) per chunk
            seen = {tuple(live)}
            for op in schedule.ops(rank):
                slot = 2 * index[op.chunk]
                if op.kind is OpKind.F:
                    live[slot] += 1
                elif op.kind is OpKind.B:
                    live[slot] -= 1
                elif op.kind is OpKind.I:
                    live[slot] -= 1
                    live[slot + 1] += 1
                else:
                    live[slot + 1] -= 1
                seen.add(tuple(live))
            self._vectors.append(_undominated(seen))
            self._receives.append(sorted({_received_boundaries(schedule, rank, action) for action in schedule.actions[rank]}))

    def peak_activations(self, rank: int, activation: Sequence[float], w_store: Sequence[float]) -> float:
        """Peak live bytes of ``rank`` with per-stage ``activation`` and ``w_store`` bytes."""
        weights = []
        for stage in self.stages[rank]:
            weights += (activation[stage], w_store[stage])
        return max(sum(count * weight for count, weight in zip(vector, weights)) for vector in self._vectors[rank])

    def receive_peak(self, rank: int, boundary_bytes: Sequence[float]) -> float:
        """Largest sum of bytes one action of ``rank`` receives (receives are posted one action ahead)."""
        if not boundary_bytes:
            return 0.0
        return max((sum(boundary_bytes[b] for b in received) for received in self._receives[rank]), default=0.0)


def _received_boundaries(schedule: Schedule, rank: int, action) -> tuple[int, ...]:
    """The stage boundaries across which ``action``'s ops receive from another rank."""
    boundaries = []
    for op in action.ops():
        recv = op_io(schedule, rank, op).recv
        if recv is not None and not recv.local:
            stage = schedule.placement.stage(rank, op.chunk)
            boundaries.append(stage - 1 if recv.payload is Payload.ACTIVATION else stage)
    return tuple(boundaries)


def _undominated(vectors: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    ordered = sorted(vectors, key=sum, reverse=True)
    kept: list[tuple[int, ...]] = []
    for vector in ordered:
        if not any(all(k >= v for k, v in zip(other, vector)) for other in kept):
            kept.append(vector)
    return kept


def estimate_memory(
    schedule: Schedule,
    stages: Sequence[StageMemory],
    *,
    boundary_bytes: Sequence[float] = (),
    sharding: OptimizerSharding = OptimizerSharding(),
    layout: MemoryLayout | None = None,
) -> tuple[RankMemory, ...]:
    """Every rank's peak (see the module docstring); ``stages[s]`` describes pipeline stage s and
    ``boundary_bytes[s]`` the activation stage s sends to s+1 (empty: receive buffers not counted)."""
    num_stages = schedule.placement.num_stages
    if len(stages) != num_stages:
        raise CostModelError(
            f"{schedule.name} on {schedule.num_ranks} ranks has {num_stages} stages, got memory for {len(stages)}; "
            f"give one StageMemory per stage"
        )
    if boundary_bytes and len(boundary_bytes) != num_stages - 1:
        raise CostModelError(f"{num_stages} stages have {num_stages - 1} boundaries, got {len(boundary_bytes)} sizes")
    layout = layout or MemoryLayout(schedule)
    w_store = [s.w_store for s in stages]
    share = sharding.optimizer_share
    result = []
    for rank in range(schedule.num_ranks):
        held = [stages[stage] for stage in layout.stages[rank]]
        activation = [s.activation for s in stages]
        for stage, local in zip(layout.stages[rank], layout.local_inputs[rank]):
            if local:  # the previous stage's saved output is this stage's saved input: count it once
                activation[stage] -= min(stages[stage].saves_input, stages[stage - 1].saves_output)
        result.append(RankMemory(
            params=sum(s.params for s in held),
            grads=sum(s.grads for s in held),
            optimizer=sum(s.optimizer for s in held) * share,
            activations=layout.peak_activations(rank, activation, w_store),
            comm_buffers=layout.receive_peak(rank, boundary_bytes),
        ))
    return tuple(result)
