"""DualPipe's mirrored parameters: rank r and rank P-1-r each hold both stage r and stage P-1-r.

Every stage has two copies, one per direction, each receiving the gradients of half the micro-batches.
After the step the two copies exchange gradients and both set ``grad = own + other``; IEEE addition is
commutative, so both copies end bit-identical and, after identical optimizer updates, stay identical.
Parameters are matched by position within the stage, so both ranks must build the stage the same way.
"""

from __future__ import annotations

from typing import Callable, Collection, Protocol, Sequence

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.transport import P2P, Channel, Transport
from dualpipe_plugin.schedules import Placement

__all__ = ["MirrorHolder", "sync_mirrored_grads", "mirrored_params"]


class MirrorHolder(Protocol):
    """What the mirror sync reads of a pipeline rank (the executor is one)."""

    placement: Placement
    rank: int
    chunks: Sequence[torch.nn.Module]
    transport: Transport

    @property
    def timeout_s(self) -> float: ...


def mirrored_params(executor: MirrorHolder) -> tuple[int, list[torch.nn.Parameter]]:
    """The mirror peer of this rank and this rank's parameters in stage order (the peer lists the same)."""
    placement = executor.placement
    rank = executor.rank
    peers = {placement.mirror_of(rank, chunk)[0] for chunk in range(placement.num_chunks)}
    if len(peers) != 1:
        raise PipelineConfigError(f"rank {rank} mirrors more than one peer: {sorted(peers)}")
    by_stage = sorted(range(placement.num_chunks), key=lambda chunk: placement.stage(rank, chunk))
    params = [p for chunk in by_stage for p in executor.chunks[chunk].parameters() if p.requires_grad]
    return peers.pop(), params


def sync_mirrored_grads(
    executor: MirrorHolder,
    *,
    grad_of: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
    skip: Collection[int] = (),
) -> None:
    """Sum each stage's gradients with its mirror copy on rank P-1-r (both end with the same sum).

    ``grad_of(param)`` names the tensor to sum in place instead of ``param.grad`` (for an adapter whose
    optimizer accumulates gradients elsewhere, e.g. DeepSpeed's bf16 optimizer and its fp32 buffers).
    ``skip`` holds ``id(param)`` of parameters reduced another way (tied weights); both ranks of a pair
    must skip the same positions of their stages.
    """
    peer, params = mirrored_params(executor)
    params = [p for p in params if id(p) not in skip]
    if peer == executor.rank or not params:
        return
    if grad_of is not None:
        grads = [grad_of(p) for p in params]
    else:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, grad in enumerate(grads):
        by_dtype.setdefault(grad.dtype, []).append(index)
    ops, buckets = [], []
    for dtype, indices in by_dtype.items():
        mine = torch.cat([grads[i].reshape(-1) for i in indices])
        theirs = torch.empty_like(mine)
        what = f"the mirrored {str(dtype).removeprefix('torch.')} gradients ({mine.numel()} values)"
        ops += [P2P(True, mine, peer, Channel.GRADIENT, what), P2P(False, theirs, peer, Channel.GRADIENT, what)]
        buckets.append((indices, mine, theirs))
    for work in executor.transport.start(ops):
        work.wait(executor.timeout_s)
    for indices, mine, theirs in buckets:
        summed = mine + theirs
        offset = 0
        for i in indices:
            n = params[i].numel()
            value = summed[offset : offset + n].view_as(grads[i])
            if grad_of is not None:
                grads[i].copy_(value)
            elif params[i].grad is None:
                params[i].grad = value.clone()
            else:
                params[i].grad.copy_(value)
            offset += n
