"""Token exchange over the expert-parallel group: ``all_to_all_single`` with split sizes, launched async.

Token counts per (rank, expert) are uneven and may be zero. A dispatch first exchanges the counts (a
small blocking ``all_to_all_single`` of ``E`` integers: every rank learns how many rows it will receive
from each peer for each of its experts), then launches the payload with ``async_op=True``; the handle's
``wait()`` finishes it. Combine is the same transfer with the split sizes swapped, and each backward is
the forward transfer of the other (dispatch⁻¹ = combine's shape, combine⁻¹ = dispatch's shape).

Every rank of the group issues every transfer, even with zero rows to send or receive: an all-to-all is
a collective. On gloo the transfer progresses on gloo's own threads; on NCCL it runs on NCCL's stream
and ``wait()`` makes the current stream wait for it (the counts' ``tolist()`` is a host sync, as in
Megatron's dispatcher). With no group (or a group of one) the exchange is local and costs nothing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from dualpipe_plugin.runtime.staged import Handle, Ready, Tensors

__all__ = ["ExpertParallel", "new_expert_parallel"]


class _Transfer:
    """Launched ``all_to_all_single`` s: ``wait()`` waits for all of them and returns ``then(received)``."""

    __slots__ = ("_works", "_received", "_then")

    def __init__(self, works: list, received: torch.Tensor, then: Callable[[torch.Tensor], Tensors]):
        self._works, self._received, self._then = works, received, then

    def wait(self) -> Tensors:
        while self._works:
            self._works.pop(0).wait()
        return self._then(self._received)


class ExpertParallel:
    """This rank's place in an expert-parallel group (``group=None``: a group of one, no communication).

    ``counts_group`` (same ranks) carries the count exchanges: collectives of one gloo group share one
    connection per peer and run in order, so a count exchange on ``group`` would wait behind the other
    side's payload still in flight and stall the thread that should be computing. Build both with
    :func:`new_expert_parallel`; without one, the counts use ``group``.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, counts_group: dist.ProcessGroup | None = None):
        self.group = group
        self.counts_group = group if counts_group is None else counts_group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._ballast = torch.zeros(0, 0)  # read-only zeros sent as emulated volume (see start)

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [size * L] (rows for each expert of the group, from this rank) -> [size, L] received:
        row ``src`` holds what rank ``src`` sends to each of this rank's ``L`` experts. Blocking."""
        if self.size == 1:
            return counts.view(1, -1)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.counts_group)
        return received.view(self.size, -1)

    def start(
        self,
        rows: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        then: Callable[[torch.Tensor], Tensors],
        *,
        ballast: int = 0,
    ) -> Handle:
        """Launch the exchange of ``rows`` (``send_splits[r]`` rows to rank r, ``recv_splits[r]`` from it).

        ``ballast`` > 0 (the emulated device's ``wire_padding``) also sends that many zero columns per row
        in a second transfer on the same group, from a cached zero buffer into scratch that is never
        read: realistic volume on the wire without copying it on this thread.
        """
        if self.size == 1:
            return Ready(then(rows.detach()))
        received = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        recv_splits, send_splits = list(recv_splits), list(send_splits)
        works = [dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits,
                                        group=self.group, async_op=True)]
        if ballast:
            sent = sum(send_splits)
            if self._ballast.shape[0] < sent or self._ballast.shape[1] != ballast:
                self._ballast = rows.new_zeros(max(sent, self._ballast.shape[0]), ballast)
            scratch = rows.new_empty(sum(recv_splits), ballast)
            works.append(dist.all_to_all_single(scratch, self._ballast[:sent], recv_splits, send_splits,
                                                group=self.group, async_op=True))
        return _Transfer(works, received, then)


def new_expert_parallel(groups: Sequence[Sequence[int]], backend: str | None = None) -> ExpertParallel:
    """This process's :class:`ExpertParallel` among ``groups`` (lists of global ranks, disjoint); EVERY
    process must call this with the same list. A process in no group of two or more ranks gets a group of one.
    """
    me, mine = dist.get_rank(), ExpertParallel()
    for ranks in groups:
        if len(ranks) < 2:
            continue
        payload, counts = dist.new_group(list(ranks), backend=backend), dist.new_group(list(ranks), backend=backend)
        if me in ranks:
            mine = ExpertParallel(payload, counts)
    return mine
