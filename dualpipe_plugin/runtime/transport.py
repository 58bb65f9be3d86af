"""The runtime's only door to the network: point-to-point sends/receives, a small all-reduce, a barrier.

The executor commits the transfers of one op boundary as one batch (``start``), waits on each receive
just before it is needed, and reaps sends lazily. :class:`TorchTransport` is the default, on
``torch.distributed`` process groups: activations and gradients travel on *separate* groups, so the two
directions of traffic between one pair of ranks (P=2, or the middle of dualpipe) can never be matched to
the wrong receive, even on NCCL where tags are ignored. On NCCL a batch goes out through
``batch_isend_irecv``, one NCCL group call per channel (like DeepSeek's reference, which batches each op
boundary's transfers); on gloo each op is issued on its own. The NCCL path is not exercised by CI (no
multi-GPU machine there); the gloo path is, in every multi-process test.

The collectives (``all_reduce_sum``, ``barrier``) are sums over the pipeline ranks built from the same
named point-to-point links (:mod:`~dualpipe_plugin.runtime.collectives`), waited with the caller's
timeout: a rank that never joins raises :class:`PipelineTimeoutError` after ``timeout_s`` on the
others, a dead one :class:`PipelinePeerError` at once; both name this pipeline rank, the missing rank
and the operation. (``torch.distributed.all_reduce`` reports a broken ring without saying whose.)

Adapters build a transport from their framework's pipeline group and ranks (DeepSpeed's grid, Megatron's
parallel_state); nothing here assumes the pipeline is the WORLD group.
"""

from __future__ import annotations

import datetime
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from dualpipe_plugin.runtime.collectives import sum_over_ranks
from dualpipe_plugin.runtime.errors import PipelinePeerError, PipelineTimeoutError
from dualpipe_plugin.runtime.links import P2P, Channel, Work
from dualpipe_plugin.runtime.options import DEFAULT_TIMEOUT_S

__all__ = ["Channel", "P2P", "Work", "Transport", "TorchTransport", "new_pipeline_groups"]


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
        errors; wait at most ``timeout_s`` seconds (None: the default pipeline timeout)."""
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
        """In-place sum over the pipeline ranks (:func:`~dualpipe_plugin.runtime.collectives.sum_over_ranks`):
        a dead or missing peer raises, naming itself, instead of hanging. ``timeout_s=None`` waits
        :data:`~dualpipe_plugin.runtime.options.DEFAULT_TIMEOUT_S`."""
        sum_over_ranks(self, tensor, what=what, timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
                       global_ranks=self.ranks)

    def barrier(self, *, what: str = "a barrier", timeout_s: float | None = None) -> None:
        """Every pipeline rank reaches this point (a sum of one element), or this raises after ``timeout_s``."""
        self.all_reduce_sum(torch.zeros(1, device=self.device), what=what, timeout_s=timeout_s)
