"""The overlap engine: one F&B pair with the forward of one chunk interleaved with the backward of the other.

DualPipe's point is that inside an F&B pair one chunk's all-to-all hides behind the other chunk's
compute. Both chunks are :class:`~dualpipe_plugin.runtime.staged.StagedChunk` s (the protocol, see
``staged.py``); the engine walks the forward sub-stages of chunk ``a`` and the backward sub-stages of
chunk ``b`` in ONE thread, launching every transfer asynchronously and waiting for it only when its result
is needed. On CPU, gloo moves the bytes on its own threads while this thread computes (torch ops and the
emulated device's sleeps release the GIL); on CUDA the same calls put NCCL on its own stream and
``work.wait()`` makes the compute stream wait for it, so kernels of the other side keep flowing.

The rule (both sides are lists of sub-stages; B is the backward side, walked in reverse)::

    repeat until both sides are finished:
      1 launch   each side (B first) whose next sub-stage is COMM and that has nothing in flight launches it
      2 compute  the first side (B, then F) whose next sub-stage is COMPUTE and that has nothing in flight
                 runs it (B's under the W store's capture: only the input-gradient part runs now); back to 1
      3 fill     else, if B left weight-gradient parts behind, run the oldest; back to 1
      4 wait     else, wait for the transfer launched first; back to 1
    a side that runs out of sub-stages finishes at once: F hands its outputs on (send or loss), B its input
    gradients (send) - both launched at that moment, not at the end of the pair; the P2P receives that
    feed the pair were posted ahead by the executor and are waited only when the side's first
    sub-stage needs them

For chunks of MoE blocks (attn, dispatch, experts, combine) the rule yields DeepSeek-V3's figure and
Megatron's ``combined_1f1b`` order; per pair of layers, each transfer flies during the compute after it
on its line (``tests/moe/test_overlap_engine.py`` checks this order call by call)::

    launch B combine⁻¹           run F attn
    launch F dispatch            wait B combine⁻¹    run B experts (I)
    launch B dispatch⁻¹          run B experts (W)   wait F dispatch    run F experts
    launch F combine             wait B dispatch⁻¹   run B attn (I)
    launch B combine⁻¹ (next)    run B attn (W)      wait F combine     run F attn (next layer) ...

The order depends only on the sub-stages' kinds, never on timing, so every rank of an expert-parallel
group issues its collectives in the same order (a timing-dependent choice could cross one rank's
forward dispatch with its peer's backward combine and deadlock). Inside the pair the backward is a full
B, as in DeepSeek's reference: every weight-gradient part runs before the pair ends.

Gradients are bit-identical to the sequential pair: the forward of ``a`` and the backward of ``b``
touch disjoint parameters and activations, and each sub-stage runs the same kernels in both orders.
The one condition: a layer must not run twice inside one sub-stage (the W store sums a parameter's
deferred gradients before accumulating, which rounds differently from accumulating them one by one).

``overlap_engine_for(chunks)`` is what :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline` asks for;
chunks that are not StagedChunks get sequential pairs and one :class:`OverlapFallbackWarning`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from dualpipe_plugin.runtime.staged import Handle, StageKind, StagedChunk, StagedRun, Tensors, claim_backward
from dualpipe_plugin.runtime.weight_grad import WeightGradStore

__all__ = ["OverlapFallbackWarning", "PairEngine", "Side", "StageEvent", "run_pair_sides", "overlap_engine_for"]


class OverlapFallbackWarning(UserWarning):
    """Overlap was requested but the chunks do not implement the protocol: F&B pairs run sequentially."""


@dataclass(frozen=True, slots=True)
class StageEvent:
    """One traced step of a pair (times in seconds from ``time.perf_counter``)."""

    side: str
    stage: str
    what: str
    """'compute', 'comm' (launch to wait), or 'weight' (a deferred weight-gradient part)."""
    start: float
    end: float


class Side:
    """One half of a pair: a :class:`StagedRun` walked forward, or backward in reverse.

    ``begin()`` returns ``(run, values)`` (the run and its inputs, or its output gradients) and is called
    when the first sub-stage is needed; a None run means there is nothing to do. ``finish(run, values)``
    gets the last outputs or the input gradients. A backward side with a ``store`` runs each compute
    sub-stage's input-gradient part at once and queues its weight-gradient part (:meth:`fill`).
    """

    def __init__(
        self,
        label: str,
        chunk: StagedChunk,
        begin: Callable[[], tuple[StagedRun | None, Tensors]],
        finish: Callable[[StagedRun | None, Tensors], None],
        *,
        backward: bool = False,
        store: WeightGradStore | None = None,
        trace: list[StageEvent] | None = None,
    ):
        self.label = label
        self._kinds = chunk.kinds
        self._order = list(reversed(range(len(self._kinds)))) if backward else list(range(len(self._kinds)))
        self._begin, self._finish = begin, finish
        self._backward, self._store, self._trace = backward, store, trace
        self._position = 0
        self._run: StagedRun | None = None
        self._values: Tensors = ()
        self._started = False
        self._inflight: tuple[int, Handle, float] | None = None
        self._weights: list[tuple[tuple, str]] = []
        self.finished = False

    # -- state -------------------------------------------------------------------------------------
    @property
    def next_kind(self) -> StageKind | None:
        """The kind of the next sub-stage, or None when none is left."""
        return None if self._position >= len(self._order) else self._kinds[self._order[self._position]]

    @property
    def busy(self) -> bool:
        """A transfer of this side is in flight."""
        return self._inflight is not None

    @property
    def has_weights(self) -> bool:
        return bool(self._weights)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._run, self._values = self._begin()
        if self._run is None:
            self._position = len(self._order)
            self._complete()

    def _complete(self) -> None:
        if not self.finished:
            self.finished = True
            self._finish(self._run, self._values)

    def _advance(self, values: Tensors) -> None:
        self._values = values
        self._position += 1
        if self._position >= len(self._order):
            self._complete()

    def _call(self, index: int) -> Handle:
        run = self._run
        return run.backward(index, self._values) if self._backward else run.forward(index, self._values)

    def _event(self, stage: str, what: str, start: float) -> None:
        if self._trace is not None:
            self._trace.append(StageEvent(self.label, stage, what, start, time.perf_counter()))

    # -- the three moves ---------------------------------------------------------------------------
    def launch(self) -> None:
        """Launch the next sub-stage (a COMM) without waiting for it."""
        self._start()
        if self.finished:
            return
        index = self._order[self._position]
        start = time.perf_counter()
        self._inflight = (index, self._call(index), start)

    def wait(self) -> None:
        """Wait for the transfer in flight and move past it."""
        index, handle, start = self._inflight
        self._inflight = None
        values = handle.wait()
        self._event(self._run.stages[index].name, "comm", start)
        self._advance(values)

    def compute(self) -> None:
        """Run the next sub-stage (a COMPUTE); on a backward side, only its input-gradient part."""
        self._start()
        if self.finished:
            return
        index = self._order[self._position]
        start = time.perf_counter()
        name = self._run.stages[index].name
        if self._backward and self._store is not None:
            key = ("overlap", id(self), index)
            with self._store.capture(key):
                values = self._call(index).wait()
            self._weights.append((key, name))
        else:
            values = self._call(index).wait()
        self._event(name, "compute", start)
        self._advance(values)

    def fill(self) -> None:
        """Run the oldest deferred weight-gradient part."""
        key, name = self._weights.pop(0)
        start = time.perf_counter()
        self._store.flush(key)
        self._event(name, "weight", start)

    def drain(self) -> None:
        while self._weights:
            self.fill()


def run_pair_sides(forward: Side, backward: Side, *, overlap: bool = True) -> None:
    """Run a pair: interleaved by the rule in the module docstring, or (``overlap=False``) F then B."""
    if not overlap:
        for side in (forward, backward):
            while side.next_kind is not None and not side.finished:
                if side.next_kind is StageKind.COMM:
                    side.launch()
                    if side.busy:
                        side.wait()
                else:
                    side.compute()
                    side.drain()
        return
    sides = (backward, forward)
    launched: list[Side] = []  # in flight, oldest first
    while True:
        for side in sides:  # 1 launch
            if side.next_kind is StageKind.COMM and not side.busy and not side.finished:
                side.launch()
                if side.busy:
                    launched.append(side)
        ready = next(
            (s for s in sides if s.next_kind is StageKind.COMPUTE and not s.busy and not s.finished), None
        )
        if ready is not None:  # 2 compute
            ready.compute()
        elif backward.has_weights:  # 3 fill
            backward.fill()
        elif launched:  # 4 wait
            launched.pop(0).wait()
        else:
            break
    backward.drain()
    assert forward.finished and backward.finished, "an overlapped pair ended with sub-stages left"


class PairEngine:
    """The executor's :class:`~dualpipe_plugin.runtime.executor.OverlapEngine` for StagedChunks.

    It runs the chunk modules itself (``chunks[c](*inputs)`` is what the standalone hooks do) and uses
    the executor's public step pieces for everything else: receiving, sending, the loss and the stash.
    """

    def __init__(self, chunks: Sequence[nn.Module], *, trace: list[StageEvent] | None = None):
        self.chunks = list(chunks)
        self.trace = trace

    def supports(self, forward_chunk: int, backward_chunk: int) -> bool:
        return all(isinstance(self.chunks[c], StagedChunk) for c in (forward_chunk, backward_chunk))

    def run_pair(self, executor, pair) -> None:
        f_op, b_op = pair.forward, pair.backward
        f_chunk, b_chunk = executor.chunks[f_op.chunk], executor.chunks[b_op.chunk]
        f_inputs: Tensors = ()
        b_stash = None

        def begin_forward():
            nonlocal f_inputs
            f_inputs = executor.staged_inputs(f_op, executor.forward_inputs(f_op))
            return f_chunk.begin(f_inputs), f_inputs

        def finish_forward(run, outputs):
            executor.forward_finish(f_op, f_inputs, run.stitch(outputs))
            executor.launch_queued()

        def begin_backward():
            nonlocal b_stash
            b_stash, grads = executor.backward_grads(b_op)
            return claim_backward(b_chunk, b_stash.roots, grads)

        def finish_backward(run, input_grads):
            if run is not None:
                run.deposit_input_grads(input_grads)
            executor.backward_finish(b_op, b_stash)
            executor.launch_queued()

        forward = Side(f"F{f_op.chunk}:{f_op.microbatch}", f_chunk, begin_forward, finish_forward, trace=self.trace)
        backward = Side(
            f"B{b_op.chunk}:{b_op.microbatch}", b_chunk, begin_backward, finish_backward,
            backward=True, store=executor.store, trace=self.trace,
        )
        run_pair_sides(forward, backward, overlap=True)


def overlap_engine_for(chunks: Sequence[nn.Module], *, warn: bool = True) -> PairEngine | None:
    """The overlap engine for ``chunks``, or None (sequential pairs) if they do not implement the protocol.

    With ``warn`` (overlap explicitly requested) a fallback says so once, as an
    :class:`OverlapFallbackWarning`, not an error: the step is still correct, only slower.
    """
    plain = [f"{index} ({type(chunk).__name__})" for index, chunk in enumerate(chunks)
             if not isinstance(chunk, StagedChunk)]
    if not plain:
        return PairEngine(chunks)
    if warn:
        warnings.warn(
            f"overlap requested but chunk(s) {', '.join(plain)} are not StagedChunks (the overlap protocol, "
            f"see dualpipe_plugin.runtime.staged): F&B pairs will run sequentially. Build the chunks with "
            f"StagedChunk(parts) to overlap, or pass overlap=False to silence this.",
            OverlapFallbackWarning,
            stacklevel=3,
        )
    return None
