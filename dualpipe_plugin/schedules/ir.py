"""The schedule IR: immutable data saying what each pipeline rank computes, in order.

A schedule holds *compute* actions only. Transfers between ranks are not stored: they follow from the
:class:`Placement` (which stage each (rank, chunk) holds, and in which order a micro-batch visits them)
and are derived by :mod:`dualpipe_plugin.schedules.lowering`.

Text form, one line per rank (``rank R: OP OP ...``)::

    F{c}:{m}            forward of chunk c, micro-batch m
    B{c}:{m}            full backward (input and weight gradients)
    I{c}:{m}            backward for inputs only; its weight gradients wait for the matching W
    W{c}:{m}            the deferred weight gradients of I{c}:{m}
    F{c}:{m}&B{c'}:{m'} an overlapped pair: one chunk's forward interleaved with another's full backward

For ``dualpipe`` the chunk index is the direction (0: micro-batches enter at rank 0, 1: at rank P-1) and
``m`` counts 0..C/2-1 within it; for ``dualpipev`` chunk 0 is stage r and chunk 1 is stage 2P-1-r.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, NamedTuple, Union

from dualpipe_plugin.schedules.errors import ScheduleParseError

__all__ = [
    "OpKind", "Op", "Pair", "Action", "Slot", "Placement", "Schedule", "parse_action", "parse_ranks", "format_ranks",
]


class OpKind(str, Enum):
    """What a compute op does. ``I`` + ``W`` together equal ``B``."""

    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the name the zero-bubble literature uses
    W = "W"

    @property
    def is_backward(self) -> bool:
        """True for the ops that consume an output gradient (B and I)."""
        return self in (OpKind.B, OpKind.I)


@dataclass(frozen=True, slots=True)
class Op:
    """One compute op of one (chunk, micro-batch) on one rank."""

    kind: OpKind
    chunk: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.chunk}:{self.microbatch}"

    @property
    def key(self) -> tuple[int, int]:
        """(chunk, micro-batch): what F, B/I and W of the same work share."""
        return (self.chunk, self.microbatch)

    def ops(self) -> tuple["Op", ...]:
        return (self,)


@dataclass(frozen=True, slots=True)
class Pair:
    """An overlapped F&B pair: ``forward`` and ``backward`` (a full B) run interleaved as one action."""

    forward: Op
    backward: Op

    def __post_init__(self) -> None:
        if self.forward.kind is not OpKind.F or self.backward.kind is not OpKind.B:
            raise ScheduleParseError(f"an overlapped pair is F&B, got {self.forward}&{self.backward}")

    def __str__(self) -> str:
        return f"{self.forward}&{self.backward}"

    def ops(self) -> tuple[Op, ...]:
        return (self.forward, self.backward)


Action = Union[Op, Pair]

_OP_RE = re.compile(r"^([FBIW])(\d+):(\d+)$")


def _parse_op(text: str) -> Op:
    match = _OP_RE.match(text)
    if match is None:
        raise ScheduleParseError(
            f"cannot parse op {text!r}: expected KIND CHUNK ':' MICROBATCH with KIND one of F, B, I, W "
            f"(for example 'F0:3' or 'W1:0')"
        )
    return Op(OpKind(match.group(1)), int(match.group(2)), int(match.group(3)))


def parse_action(text: str) -> Action:
    """Parse ``F0:3``, ``I1:2`` or ``F0:3&B1:1``; ``str(parse_action(s)) == s``."""
    if "&" in text:
        forward, _, backward = text.partition("&")
        return Pair(_parse_op(forward), _parse_op(backward))
    return _parse_op(text)


class Slot(NamedTuple):
    """Where one (rank, chunk) sits: its flow, its stage on that flow's route, and its neighbours."""

    flow: int
    stage: int
    prev_hop: tuple[int, int] | None
    next_hop: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the pipeline stages live and the route each micro-batch takes through them.

    ``routes[f]`` lists, in visiting order, the (rank, chunk) slots a micro-batch of *flow* f passes
    through; position i on a route is pipeline stage i. dualpipe has two flows (one per direction, each
    with C/2 micro-batches) whose chunk index equals the flow; the other schedules have one flow.
    """

    num_ranks: int
    routes: tuple[tuple[tuple[int, int], ...], ...]
    _slots: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        slots = {}
        for flow, route in enumerate(self.routes):
            for stage, where in enumerate(route):
                prev_hop = route[stage - 1] if stage > 0 else None
                next_hop = route[stage + 1] if stage + 1 < len(route) else None
                slots[where] = Slot(flow, stage, prev_hop, next_hop)
        object.__setattr__(self, "_slots", slots)

    @property
    def num_stages(self) -> int:
        return len(self.routes[0])

    @property
    def num_chunks(self) -> int:
        """Model chunks held by each rank."""
        return 1 + max(chunk for route in self.routes for _, chunk in route)

    @property
    def mirrored(self) -> bool:
        """True when every stage is held by two ranks (dualpipe): their gradients must be summed."""
        return len(self.routes) > 1

    def holds(self, rank: int, chunk: int) -> bool:
        return (rank, chunk) in self._slots

    def slot(self, rank: int, chunk: int) -> Slot:
        return self._slots[(rank, chunk)]

    def flow_of(self, chunk: int) -> int:
        """The flow a chunk's micro-batches belong to (its direction for dualpipe, else 0)."""
        return chunk if self.mirrored else 0

    def stage(self, rank: int, chunk: int) -> int:
        """The pipeline stage (which slice of the model) that ``rank`` holds as ``chunk``."""
        return self._slots[(rank, chunk)].stage

    def next_hop(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """Where this slot's forward output goes; None on a route's last stage (the loss)."""
        return self._slots[(rank, chunk)].next_hop

    def prev_hop(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """Where this slot's forward input comes from; None on a route's first stage (the data)."""
        return self._slots[(rank, chunk)].prev_hop

    def is_first(self, rank: int, chunk: int) -> bool:
        return self.prev_hop(rank, chunk) is None

    def is_last(self, rank: int, chunk: int) -> bool:
        return self.next_hop(rank, chunk) is None

    def holds_first_stage(self, rank: int) -> bool:
        """True when ``rank`` holds the first stage of some route (it needs the inputs)."""
        return any(route[0][0] == rank for route in self.routes)

    def holds_last_stage(self, rank: int) -> bool:
        """True when ``rank`` holds the last stage of some route (it computes losses)."""
        return any(route[-1][0] == rank for route in self.routes)

    def last_stage_ranks(self) -> tuple[int, ...]:
        """The ranks that compute losses, ascending (P-1; 0 for a V; 0 and P-1 for DualPipe)."""
        return tuple(sorted({route[-1][0] for route in self.routes}))

    def mirror_of(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """For a mirrored placement, the other (rank, chunk) holding the same stage."""
        if not self.mirrored:
            return None
        slot = self._slots[(rank, chunk)]
        return self.routes[1 - slot.flow][slot.stage]


@dataclass(frozen=True, slots=True)
class Schedule:
    """A complete schedule: per-rank action lists over ``num_microbatches`` micro-batches in total."""

    name: str
    placement: Placement
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    def microbatches_per_flow(self) -> int:
        return self.num_microbatches // len(self.placement.routes)

    def ops(self, rank: int) -> Iterator[Op]:
        """Every op of a rank in order, pairs flattened forward first."""
        for action in self.actions[rank]:
            yield from action.ops()

    def global_microbatch(self, chunk: int, microbatch: int) -> int:
        """Index into the user's C micro-batches: dualpipe's second direction takes the second half."""
        return self.placement.flow_of(chunk) * self.microbatches_per_flow() + microbatch

    def to_text(self) -> str:
        return format_ranks(self.actions)

    def __str__(self) -> str:
        return self.to_text()


def format_ranks(actions: tuple[tuple[Action, ...], ...] | list[list[Action]]) -> str:
    """The text form: ``rank R: OP OP ...`` per line."""
    return "\n".join(f"rank {rank}: " + " ".join(map(str, row)) for rank, row in enumerate(actions))


_RANK_RE = re.compile(r"^\s*rank\s+(\d+)\s*:(.*)$")


def parse_ranks(text: str) -> list[list[Action]]:
    """Parse the text form back into per-rank action lists (ranks must be 0..P-1 in order)."""
    rows: list[list[Action]] = []
    for lineno, line in enumerate(text.strip().splitlines(), start=1):
        match = _RANK_RE.match(line)
        if match is None or int(match.group(1)) != len(rows):
            raise ScheduleParseError(f"line {lineno}: expected 'rank {len(rows)}: OP OP ...', got {line!r}")
        rows.append([parse_action(token) for token in match.group(2).split()])
    return rows
