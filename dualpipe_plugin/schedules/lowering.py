"""Lowering: derive what each compute op needs and sends from the placement (transfers are not stored).

A micro-batch's forward visits the stages of its route in order; its backward visits them in reverse. So
for an op of (chunk c, micro-batch m) on rank r at stage s of flow f:

- ``F`` needs the activation of stage s-1 (none at stage 0) and sends its output to stage s+1;
- ``B``/``I`` need the output gradient from stage s+1 (none at the last stage: the loss) and the op's own
  ``F``; they send the input gradient to stage s-1;
- ``W`` needs the ``I`` of the same (c, m) on the same rank.

An edge between two slots on the same rank (the bottom of dualpipev's V) is ``local``: no transfer.
"""

from __future__ import annotations

from typing import NamedTuple
from enum import Enum

from dualpipe_plugin.schedules.ir import Op, OpKind, Schedule

__all__ = ["Payload", "Transfer", "Event", "OpIO", "op_events", "op_io", "lower"]


class Payload(str, Enum):
    """What a transfer carries: a forward activation or a backward (input) gradient."""

    ACTIVATION = "activation"
    GRADIENT = "gradient"


Event = tuple  # (what, flow, stage, microbatch): what is "F" (forward output), "G" (input gradient), "W"
"""A fact an op produces, identifying the work independently of which rank holds it. Plain tuples keep
the simulator fast at P=64, C=512."""


class Transfer(NamedTuple):
    """One message between two (rank, chunk) slots. ``src_rank == dst_rank`` means a local hand-over."""

    payload: Payload
    flow: int
    microbatch: int
    src_rank: int
    src_chunk: int
    dst_rank: int
    dst_chunk: int

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank

    def describe(self) -> str:
        return (
            f"{self.payload.value} of micro-batch {self.microbatch} (flow {self.flow}) "
            f"from rank {self.src_rank} chunk {self.src_chunk} to rank {self.dst_rank} chunk {self.dst_chunk}"
        )


class OpIO(NamedTuple):
    """An op's dependencies (events it waits for), the event it produces, and its transfers."""

    needs: tuple[Event, ...]
    produces: Event
    recv: Transfer | None
    send: Transfer | None


def op_events(flow: int, stage: int, has_next: bool, op: Op) -> tuple[tuple[Event, ...], Event]:
    """The events an op at ``stage`` of ``flow`` waits for, and the one it produces."""
    m = op.microbatch
    if op.kind is OpKind.F:
        return ((("F", flow, stage - 1, m),) if stage else ()), ("F", flow, stage, m)
    if op.kind is OpKind.W:
        return (("G", flow, stage, m),), ("W", flow, stage, m)
    own_forward = ("F", flow, stage, m)
    needs = (own_forward, ("G", flow, stage + 1, m)) if has_next else (own_forward,)
    return needs, ("G", flow, stage, m)


def op_io(schedule: Schedule, rank: int, op: Op) -> OpIO:
    flow, stage, prev_hop, next_hop = schedule.placement.slot(rank, op.chunk)
    needs, produces = op_events(flow, stage, next_hop is not None, op)
    m = op.microbatch
    recv = send = None
    if op.kind is OpKind.F:
        if prev_hop is not None:
            recv = Transfer(Payload.ACTIVATION, flow, m, *prev_hop, rank, op.chunk)
        if next_hop is not None:
            send = Transfer(Payload.ACTIVATION, flow, m, rank, op.chunk, *next_hop)
    elif op.kind.is_backward:
        if next_hop is not None:
            recv = Transfer(Payload.GRADIENT, flow, m, *next_hop, rank, op.chunk)
        if prev_hop is not None:
            send = Transfer(Payload.GRADIENT, flow, m, rank, op.chunk, *prev_hop)
    return OpIO(needs, produces, recv, send)


def lower(schedule: Schedule) -> list[list[tuple[Op, OpIO]]]:
    """Every rank's ops (pairs flattened, forward first) with their derived inputs and outputs."""
    return [[(op, op_io(schedule, rank, op)) for op in schedule.ops(rank)] for rank in range(schedule.num_ranks)]
