"""The runtime's collectives (a sum over the pipeline ranks, a barrier), built from named point-to-point links.

Every rank sends its part to every other rank and receives theirs, then adds the parts up in rank order,
so the result is bit-identical on every rank. Built this way, rather than on the backend's all-reduce,
each rank knows *which* rank failed it: a receive that times out names a stuck rank after ``timeout_s``,
a receive from a dead process names the dead rank at once, exactly as the step's own transfers do. (An
all-reduce only reports that its ring broke; the rank and the op were lost.)

A sum over P ranks costs each rank P-1 sends and P-1 receives of one small tensor; the runtime sums a few
numbers per step (the step's loss total) and a few more per checkpoint.

The parts travel on the gradient channel. Every rank must make the same calls in the same order, between
steps, when no transfer of a step is in flight (the executor refuses to run anything once a step failed,
so the leftovers of a failed step are never taken for a collective's parts).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError, PipelinePeerError, PipelineTimeoutError
from dualpipe_plugin.runtime.links import P2P, Channel, Work

__all__ = ["sum_over_ranks"]


class _Links(Protocol):
    rank: int
    size: int

    def start(self, ops: list[P2P]) -> list[Work]: ...


def sum_over_ranks(links: _Links, tensor: torch.Tensor, *, what: str, timeout_s: float,
                   global_ranks: list[int] | None = None) -> None:
    """Replace ``tensor`` by its sum over the pipeline ranks; every pipeline rank calls it.

    Waits at most ``timeout_s`` seconds in all. A rank that does not join in time raises
    :class:`PipelineTimeoutError` on the others, a dead one :class:`PipelinePeerError`; either names this
    rank, the missing rank(s) (and their global ranks when ``global_ranks`` is given) and ``what``.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise PipelineConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    me, size = links.rank, links.size
    if size == 1:
        return
    deadline = time.monotonic() + timeout_s
    mine = tensor.detach().clone().contiguous()  # what travels; ``tensor`` takes the sum at the end
    parts: dict[int, torch.Tensor] = {me: mine}
    posted: dict[int, tuple[Work, Work, torch.Tensor]] = {}
    lost: dict[int, PipelinePeerError] = {}
    for peer in range(size):  # ascending on every rank: each pair of ranks posts to each other in one order
        if peer == me:
            continue
        theirs = torch.empty_like(mine)
        label = f"its part in {what}"  # "lost pipeline rank q ... while receiving its part in <what>"
        try:
            send, recv = links.start([P2P(True, mine, peer, Channel.GRADIENT, label),
                                      P2P(False, theirs, peer, Channel.GRADIENT, label)])
        except PipelinePeerError as error:  # the backend refused to post: that peer's connection is closed
            lost[peer] = error
            continue
        posted[peer] = (send, recv, theirs)
    late: list[int] = []
    for peer, (_, recv, theirs) in posted.items():
        try:
            recv.wait(max(deadline - time.monotonic(), 1e-3))
        except PipelineTimeoutError:
            late.append(peer)
            continue
        except PipelinePeerError as error:
            lost[peer] = error
            continue
        parts[peer] = theirs
    for peer, (send, _, _) in posted.items():
        if peer in parts and peer not in lost:  # it posted its receive with its send: ours completes
            try:
                send.wait(max(deadline - time.monotonic(), 1e-3))
            except PipelinePeerError as error:
                lost[peer] = error
            except PipelineTimeoutError:
                late.append(peer)
    if lost or late:
        raise _failure(me, what, timeout_s, lost, sorted(late), global_ranks)
    total = parts[0].clone()
    for rank in range(1, size):
        total += parts[rank]
    tensor.copy_(total)


def _named(ranks: list[int], global_ranks: list[int] | None) -> str:
    names = ", ".join(str(r) for r in ranks)
    noun = "pipeline rank" if len(ranks) == 1 else "pipeline ranks"
    if global_ranks is None:
        return f"{noun} {names}"
    return f"{noun} {names} (global {'rank' if len(ranks) == 1 else 'ranks'} " \
           f"{', '.join(str(global_ranks[r]) for r in ranks)})"


def _failure(me: int, what: str, timeout_s: float, lost: dict[int, PipelinePeerError], late: list[int],
             global_ranks: list[int] | None) -> Exception:
    if lost:
        # The transport's own message names the dead rank, its global rank, the op and the backend's words.
        first = lost[min(lost)]
        others = sorted(set(lost) - {min(lost)})
        also = f"; {_named(others, global_ranks)} also lost" if others else ""
        also += f"; {_named(late, global_ranks)} did not join it within {timeout_s:g} s" if late else ""
        return PipelinePeerError(f"{first}{also}; that rank crashed or was killed: its own log has the cause")
    return PipelineTimeoutError(
        f"pipeline rank {me}: timed out after {timeout_s:g} s in {what}: {_named(late, global_ranks)} did not "
        f"join it; {'it is' if len(late) == 1 else 'they are'} stuck, dead, or did not make the same call (every "
        f"pipeline rank must). Raise the timeout only if {'that rank is' if len(late) == 1 else 'they are'} "
        f"legitimately this slow."
    )
