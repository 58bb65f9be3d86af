"""A per-rank op recorder the generators write into: counts micro-batches per chunk and keeps the W queue.

Generators say *what kind* of op comes next on which chunk; the recorder numbers it. Micro-batches of a
chunk are always forwarded, back-propagated and weight-updated in increasing order, and a ``W`` always
completes the oldest pending ``I`` of the rank (a FIFO, as in DeepSeek's reference).
"""

from __future__ import annotations

from collections import deque

from dualpipe_plugin.schedules.ir import Action, Op, OpKind, Pair

__all__ = ["RankProgram"]


class RankProgram:
    """Builds one rank's action list."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._next_forward: dict[int, int] = {}
        self._next_backward: dict[int, int] = {}
        self._pending_weight: deque[Op] = deque()

    def _take(self, counters: dict[int, int], chunk: int) -> int:
        microbatch = counters.get(chunk, 0)
        counters[chunk] = microbatch + 1
        return microbatch

    def _new_forward(self, chunk: int) -> Op:
        return Op(OpKind.F, chunk, self._take(self._next_forward, chunk))

    def _new_backward(self, chunk: int, split: bool) -> Op:
        op = Op(OpKind.I if split else OpKind.B, chunk, self._take(self._next_backward, chunk))
        if split:
            self._pending_weight.append(Op(OpKind.W, chunk, op.microbatch))
        return op

    def forward(self, chunk: int) -> None:
        self.actions.append(self._new_forward(chunk))

    def backward(self, chunk: int, split: bool = False) -> None:
        """A full backward ``B``, or with ``split`` an input-only ``I`` whose ``W`` is queued."""
        self.actions.append(self._new_backward(chunk, split))

    def weight(self) -> None:
        """The deferred weight gradients of the oldest pending ``I``."""
        self.actions.append(self._pending_weight.popleft())

    def pair(self, forward_chunk: int, backward_chunk: int) -> None:
        """An overlapped F&B pair (the backward is always full)."""
        self.actions.append(Pair(self._new_forward(forward_chunk), self._new_backward(backward_chunk, False)))

    @property
    def pending_weights(self) -> int:
        return len(self._pending_weight)
