"""One step's transfers on one rank: receive posting (ahead of need), headers, local hand-over, send reaping.

Shapes. A receiver learns what an activation looks like from a header sent ahead of the first payload
on each incoming link in each step (or ahead of every payload with ``shapes_per_microbatch``); later
receives on that link are posted as soon as the header is known. Gradients need no header: they have
the shapes of the activations this rank sent, which the executor supplies.

Ordering. On one link (sender slot -> receiver slot, payload kind) messages go out in micro-batch order
and receives are posted in the same order, so FIFO matching (gloo per tag, NCCL per communicator) pairs
them correctly; activation and gradient links use different process groups (see transport.py).

Local hand-over. The bottom of dualpipev's V (stage P-1 -> stage P on the last rank) is a dictionary
lookup, not a transfer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError, PipelineRuntimeError
from dualpipe_plugin.runtime.meta import HEADER_LEN, TensorMeta, decode_header, describe, encode_header
from dualpipe_plugin.runtime.transport import P2P, Channel, Transport, Work
from dualpipe_plugin.schedules.lowering import Payload, Transfer

__all__ = ["StepComm"]


def _channel(transfer: Transfer) -> Channel:
    return Channel.ACTIVATION if transfer.payload is Payload.ACTIVATION else Channel.GRADIENT


def _link(transfer: Transfer) -> tuple:
    return (transfer.payload, transfer.flow, transfer.src_rank, transfer.src_chunk, transfer.dst_chunk)


@dataclass
class _Pending:
    """A receive: its header (if any), the payload buffers and handles once posted."""

    transfer: Transfer
    header: torch.Tensor | None = None
    header_work: Work | None = None
    metas: tuple[TensorMeta, ...] | None = None
    buffers: list[torch.Tensor] = field(default_factory=list)
    works: list[Work] = field(default_factory=list)


class StepComm:
    """Transfers of one rank during one step. Create one per step; call :meth:`finish` at its end."""

    def __init__(
        self,
        transport: Transport,
        timeout_s: float,
        gradient_metas: Callable[[Transfer], tuple[TensorMeta, ...] | None],
        shapes_per_microbatch: bool = False,
    ):
        self._transport = transport
        self._timeout_s = timeout_s
        self._gradient_metas = gradient_metas
        self._per_microbatch = shapes_per_microbatch
        self._device = transport.device
        self._queued: list[tuple[P2P, Callable[[Work], None]]] = []
        self._pending: dict[Transfer, _Pending] = {}
        self._link_metas: dict[tuple, tuple[TensorMeta, ...]] = {}
        self._link_header_posted: set[tuple] = set()
        self._link_waiting: dict[tuple, list[_Pending]] = {}
        self._link_header_sent: dict[tuple, tuple[TensorMeta, ...]] = {}
        self._local: dict[Transfer, tuple[tuple[torch.Tensor, ...], tuple[TensorMeta, ...]]] = {}
        self._sends: list[Work] = []
        self.waited_activation_s = 0.0
        """Seconds spent blocked receiving activations (and their shape headers)."""
        self.waited_gradient_s = 0.0
        """Seconds spent blocked receiving gradients."""

    @property
    def waited_s(self) -> float:
        """Seconds spent blocked on receives; the executor reads it to time compute apart from waiting."""
        return self.waited_activation_s + self.waited_gradient_s

    # -- receiving -------------------------------------------------------------------------------
    def post_recv(self, transfer: Transfer) -> None:
        """Post the receive for ``transfer`` as early as its shapes allow (idempotent)."""
        if transfer.local or transfer in self._pending:
            return
        pending = _Pending(transfer)
        link = _link(transfer)
        if transfer.payload is Payload.GRADIENT:
            metas = self._gradient_metas(transfer)
            if metas is None:  # its forward has not run yet: post when the backward asks for it
                return
            self._pending[transfer] = pending
            self._post_payload(pending, metas)
            return
        self._pending[transfer] = pending
        if not self._per_microbatch and link in self._link_metas:
            self._post_payload(pending, self._link_metas[link])
        elif self._per_microbatch or link not in self._link_header_posted:
            self._link_header_posted.add(link)
            pending.header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self._device)
            self._queue(P2P(False, pending.header, transfer.src_rank, Channel.ACTIVATION,
                            f"the shape header of {transfer.describe()}"),
                        lambda work, p=pending: setattr(p, "header_work", work))
        else:
            self._link_waiting.setdefault(link, []).append(pending)

    def _post_payload(self, pending: _Pending, metas: tuple[TensorMeta, ...]) -> None:
        pending.metas = metas
        pending.buffers = [meta.empty(self._device) for meta in metas]
        for index, buffer in enumerate(pending.buffers):
            self._queue(P2P(False, buffer, pending.transfer.src_rank, _channel(pending.transfer),
                            pending.transfer.describe()),
                        lambda work, p=pending: p.works.append(work))

    def recv(self, transfer: Transfer) -> tuple[tuple[torch.Tensor, ...], tuple[TensorMeta, ...]]:
        """Wait for ``transfer`` and return its tensors and their metadata."""
        if transfer.local:
            return self._local.pop(transfer)
        self.post_recv(transfer)
        pending = self._pending.get(transfer)
        if pending is None:
            raise PipelineRuntimeError(f"no shapes known to receive {transfer.describe()}: its forward never ran here")
        if pending.metas is None:
            assert pending.header is not None, "receives on one link are consumed in the order they were posted"
            self.flush()
            self._timed_wait(pending.header_work, gradient=False)
            metas = decode_header(pending.header)
            link = _link(transfer)
            if not self._per_microbatch:
                self._link_metas[link] = metas
            self._post_payload(pending, metas)
            for waiting in self._link_waiting.pop(link, []):
                self._post_payload(waiting, metas)
        self.flush()
        gradient = transfer.payload is Payload.GRADIENT
        for work in pending.works:
            self._timed_wait(work, gradient=gradient)
        del self._pending[transfer]
        return tuple(pending.buffers), pending.metas

    def _timed_wait(self, work: Work, *, gradient: bool) -> None:
        started = time.perf_counter()
        try:
            work.wait(self._timeout_s)
        finally:
            if gradient:
                self.waited_gradient_s += time.perf_counter() - started
            else:
                self.waited_activation_s += time.perf_counter() - started

    # -- sending ---------------------------------------------------------------------------------
    def send(self, transfer: Transfer, tensors: tuple[torch.Tensor, ...]) -> None:
        """Queue ``tensors`` for ``transfer`` (sent at the next :meth:`flush`)."""
        if transfer.local:  # a new autograd leaf, as if it had crossed the wire
            self._local[transfer] = (tuple(t.detach() for t in tensors), tuple(TensorMeta.of(t) for t in tensors))
            return
        channel = _channel(transfer)
        if transfer.payload is Payload.ACTIVATION:
            metas = tuple(TensorMeta.of(t) for t in tensors)
            link = _link(transfer)
            sent = self._link_header_sent.get(link)
            if self._per_microbatch or sent is None:
                self._link_header_sent[link] = metas
                header = encode_header(metas, self._device)
                self._queue(P2P(True, header, transfer.dst_rank, Channel.ACTIVATION,
                                f"the shape header of {transfer.describe()}"), self._sends.append)
            elif sent != metas:
                raise PipelineConfigError(
                    f"micro-batch {transfer.microbatch} produced {describe(metas)} but earlier micro-batches "
                    f"of this step produced {describe(sent)} on the same link; shapes must be equal within a "
                    f"step unless the executor is built with shapes_per_microbatch=True"
                )
        for tensor in tensors:
            self._queue(P2P(True, tensor.detach().contiguous(), transfer.dst_rank, channel, transfer.describe()),
                        self._sends.append)

    # -- batching --------------------------------------------------------------------------------
    def _queue(self, op: P2P, on_started: Callable[[Work], None]) -> None:
        self._queued.append((op, on_started))

    def flush(self) -> None:
        """Launch everything queued as one batch; forget sends that have completed."""
        if self._queued:
            queued, self._queued = self._queued, []
            works = self._transport.start([op for op, _ in queued])
            for (_, on_started), work in zip(queued, works):
                on_started(work)
        if len(self._sends) > 64:
            self._sends = [work for work in self._sends if not work.is_completed()]

    def finish(self) -> None:
        """Wait for every send of the step; fail if a receive was posted but never consumed."""
        self.flush()
        for work in self._sends:
            work.wait(self._timeout_s)
        self._sends.clear()
        if self._pending or self._local:
            left = [t.describe() for t in list(self._pending) + list(self._local)]
            raise PipelineRuntimeError(f"step ended with unconsumed transfers: {', '.join(left)}")
