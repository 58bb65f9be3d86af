"""The runtime's only door to the network: point-to-point sends/receives, a small all-reduce, a barrier.

The executor commits the transfers of one op boundary as one batch (``start``), waits on each receive
just before it is needed, and reaps sends lazily. :class:`TorchTransport` is the default, on
``torch.distributed`` process groups: activations and gradients travel on *separate* groups, so the two
directions of traffic between one pair of ranks (P=2, or the middle of dualpipe) can never be matched to
the wrong receive, even on NCCL where tags are ignored. On NCCL a batch goes out through
``batch_isend_irecv``, one NCCL group call per channel (like DeepSeek's reference, which batches each op
boundary's transfers); on gloo each op is issued on its own. The NCCL path is not exercised by CI (no
multi-GPU machine there); the gloo path is, in every multi-process test.

The collectives (``all_reduce_sum``, ``barrier``) are launched with ``async_op=True`` and waited with the
caller's timeout, like the point-to-point waits: a peer that never joins raises
:class:`PipelineTimeoutError` after ``timeout_s`` (gloo honours the wait timeout for collectives: measured
3.0 s for a 3 s timeout against a stalled rank), a peer that died raises :class:`PipelinePeerError`; both
name this pipeline rank, the operation and the timeout.

Adapters build a transport from their framework's pipeline group and ranks (DeepSpeed's grid, Megatron's
parallel_state); nothing here assumes the pipeline is the WORLD group.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from dualpipe_plugin.runtime.errors import PipelineConfigError, PipelinePeerError, PipelineTimeoutError

__all__ = ["Channel", "P2P", "Work", "Transport", "TorchTransport", "new_pipeline_groups"]


class Channel(IntEnum):
    """Which logical link a transfer uses."""

    ACTIVATION = 0
    GRADIENT = 1


@dataclass(frozen=True, slots=True)
class P2P:
    """One point-to-point operation: send ``tensor`` to, or receive it from, pipeline rank ``peer``."""

    send: bool
    tensor: torch.Tensor
    peer: int
    channel: Channel
    what: str
    """Human description used in errors: the op and micro-batch it serves."""


class Work(Protocol):
    def wait(self, timeout_s: float) -> None: ...

    def is_completed(self) -> bool: ...


class Transport(Protocol):
    """Pipeline-rank addressed communication. ``rank``/``size`` are positions in the pipeline."""

    rank: int
    size: int
    device: torch.device

    def start(self, ops: Sequence[P2P]) -> list[Work]:
        """Launch ``ops`` together; return one handle per op, in order."""
        ...

    def all_reduce_sum(
        self, tensor: torch.Tensor, *, what: str = "a collective", timeout_s: float | None = None,
    ) -> None:
        """In-place sum over the pipeline ranks (the step's loss, checkpoint agreement); ``what`` names it in
        errors; wait at most ``timeout_s`` seconds (None: the process group's own timeout)."""
        ...

    def barrier(self, *, what: str = "a barrier", timeout_s: float | None = None) -> None:
        """Return once every pipeline rank has called it, or raise after ``timeout_s`` seconds."""
        ...


def _lost_peer(rank: int, op: P2P, global_peer: int, text: str) -> PipelinePeerError:
    direction = "sending" if op.send else "receiving"
    return PipelinePeerError(
        f"pipeline rank {rank}: lost pipeline rank {op.peer} (global rank {global_peer}) while {direction} "
        f"{op.what}: {text.splitlines()[0] if text else 'no detail from the backend'}"
    )


class _TorchWork:
    __slots__ = ("_work", "_op", "_rank", "_global_peer")

    def __init__(self, work, op: P2P, rank: int, global_peer: int):
        self._work, self._op, self._rank, self._global_peer = work, op, rank, global_peer

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def wait(self, timeout_s: float) -> None:
        if self._work is None:
            return
        direction = "sending" if self._op.send else "receiving"
        try:
            completed = self._work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as error:
            text = str(error)
            if "timeout" in text.lower() or "timed out" in text.lower():
                raise PipelineTimeoutError(
                    f"pipeline rank {self._rank}: timed out after {timeout_s:g} s {direction} {self._op.what} "
                    f"{'to' if self._op.send else 'from'} pipeline rank {self._op.peer} (global rank "
                    f"{self._global_peer}); that rank is stuck, dead, or runs a different schedule or "
                    f"micro-batch count. Raise the timeout if its steps are legitimately this slow."
                ) from None
            raise _lost_peer(self._rank, self._op, self._global_peer, text) from None
        if completed is False:  # some backends report a timeout by returning False
            raise PipelineTimeoutError(
                f"pipeline rank {self._rank}: timed out after {timeout_s:g} s {direction} {self._op.what} "
                f"with pipeline rank {self._op.peer} (global rank {self._global_peer})"
            )
        self._work = None


def new_pipeline_groups(pipelines: Sequence[Sequence[int]], backend: str | None = None) -> dict:
    """Create the per-channel groups for every pipeline; EVERY process must call this with the same list.

    Returns ``{pipeline_index: {Channel: group}}`` for the pipelines this process belongs to.
    """
    mine = {}
    me = dist.get_rank()
    for index, ranks in enumerate(pipelines):
        groups = {channel: dist.new_group(list(ranks), backend=backend) for channel in Channel}
        if me in ranks:
            mine[index] = groups
    return mine


class TorchTransport:
    """:class:`Transport` on torch.distributed, for the pipeline made of global ``ranks`` (in stage order)."""

    def __init__(self, ranks: Sequence[int], groups: dict | None = None, device: torch.device | None = None):
        self.ranks = list(ranks)
        me = dist.get_rank()
        if me not in self.ranks:
            raise ValueError(f"global rank {me} is not in the pipeline {self.ranks}")
        self.rank = self.ranks.index(me)
        self.size = len(self.ranks)
        if groups is None:
            groups = new_pipeline_groups([self.ranks])[0]
        self.groups = groups
        backend = dist.get_backend(groups[Channel.ACTIVATION])
        self._batched = backend == "nccl"
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = device

    def start(self, ops: Sequence[P2P]) -> list[Work]:
        if not ops:
            return []
        if self._batched:  # NCCL: one group call per channel (batch_isend_irecv needs a single group)
            handles: list[Work | None] = [None] * len(ops)
            for channel in Channel:
                indices = [i for i, op in enumerate(ops) if op.channel is channel]
                if not indices:
                    continue
                p2p = [
                    dist.P2POp(dist.isend if ops[i].send else dist.irecv, ops[i].tensor, self.ranks[ops[i].peer],
                               self.groups[channel])
                    for i in indices
                ]
                works = dist.batch_isend_irecv(p2p)
                # NCCL completes a batch as a whole; torch may return one work for it: share it.
                for position, i in enumerate(indices):
                    work = works[position] if len(works) == len(indices) else works[-1]
                    handles[i] = _TorchWork(work, ops[i], self.rank, self.ranks[ops[i].peer])
            return handles
        handles = []
        for op in ops:
            call = dist.isend if op.send else dist.irecv
            kwargs = {"dst" if op.send else "src": self.ranks[op.peer]}
            try:
                work = call(op.tensor, group=self.groups[op.channel], tag=int(op.channel), **kwargs)
            except RuntimeError as error:  # gloo refuses to post on a connection the peer already closed
                raise _lost_peer(self.rank, op, self.ranks[op.peer], str(error)) from None
            handles.append(_TorchWork(work, op, self.rank, self.ranks[op.peer]))
        return handles

    def all_reduce_sum(
        self, tensor: torch.Tensor, *, what: str = "a collective", timeout_s: float | None = None,
    ) -> None:
        """In-place sum over the pipeline ranks; a dead or missing peer raises instead of hanging."""
        if timeout_s is not None and not timeout_s > 0:
            raise PipelineConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        try:
            work = dist.all_reduce(tensor, group=self.groups[Channel.GRADIENT], async_op=True)
            if timeout_s is None:
                completed = work.wait()
            else:
                completed = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as error:
            named = self._collective_error(what, timeout_s, str(error))
            if named is None:  # not a failure of a peer (e.g. a tensor the backend refuses): as it came
                raise
            raise named from None
        if completed is False:  # some backends report a timeout by returning False
            raise self._collective_error(what, timeout_s, "timed out")

    def barrier(self, *, what: str = "a barrier", timeout_s: float | None = None) -> None:
        """Every pipeline rank reaches this point (an all-reduce of one element, so it runs on any backend)."""
        self.all_reduce_sum(torch.zeros(1, device=self.device), what=what, timeout_s=timeout_s)

    def _collective_error(self, what: str, timeout_s: float | None, text: str) -> Exception | None:
        limit = f"{timeout_s:g} s" if timeout_s is not None else "the process group's timeout"
        lowered = text.lower()
        if "timeout" in lowered or "timed out" in lowered:
            return PipelineTimeoutError(
                f"pipeline rank {self.rank}: timed out after {limit} in {what} (a collective over the {self.size} "
                f"pipeline ranks, global ranks {self.ranks}); a rank did not join it: it is stuck, dead, or did "
                f"not make the same call (every pipeline rank must). Raise the timeout only if that rank is "
                f"legitimately this slow."
            )
        if any(word in lowered for word in ("connection", "peer", "broken pipe", "socket")):
            return PipelinePeerError(
                f"pipeline rank {self.rank}: lost a pipeline rank (of global ranks {self.ranks}) during {what} "
                f"(timeout {limit}): {text.splitlines()[0]}; that rank crashed or was killed: its own log has the cause"
            )
        return None
