"""DualPipe's mirrored copies: rank r and rank P-1-r each hold both stage r and stage P-1-r.

Every stage has two copies, one per direction, each running half the micro-batches. At the end of every
step the two copies are made equal again:

* **Gradients** (training steps): both set ``grad = own + other``; IEEE addition is commutative, so both
  copies end bit-identical and, after identical optimizer updates, stay identical.
* **Buffers** (every step, training or forward-only; persistent buffers, i.e. those a ``state_dict``
  holds): a floating buffer (BatchNorm's running mean and variance) becomes ``(own + other) / 2``; an
  integer one (``num_batches_tracked``) becomes ``start + (own - start) + (other - start)``, the step's
  increments of both copies added to the value both held at the step's start, so it counts every
  micro-batch of the step as one process would; any other (bool) takes the direction-0 copy's value (the
  copy a checkpoint saves). Both copies end bit-identical (the same operations on the same two values),
  so saving one copy and restoring it into both loses nothing. A running average is not split-able, so
  the floating buffers are not those of one process running the micro-batches in order: they are the
  mean of the two directions' running averages. Non-persistent buffers (caches, masks) are left alone.

Parameters and buffers are matched by position within the stage, so both ranks must build the stage the
same way. A model without persistent buffers exchanges nothing for them.
"""

from __future__ import annotations

from typing import Callable, Collection, Protocol, Sequence

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.links import P2P, Channel
from dualpipe_plugin.runtime.transport import Transport
from dualpipe_plugin.schedules import Placement

__all__ = ["MirrorHolder", "MirroredBuffers", "sync_mirrored_grads", "mirrored_params", "mirrored_buffers"]


class MirrorHolder(Protocol):
    """What the mirror sync reads of a pipeline rank (the executor is one)."""

    placement: Placement
    rank: int
    chunks: Sequence[torch.nn.Module]
    transport: Transport

    @property
    def timeout_s(self) -> float: ...


def _mirror_peer(executor: MirrorHolder) -> int:
    placement, rank = executor.placement, executor.rank
    peers = {placement.mirror_of(rank, chunk)[0] for chunk in range(placement.num_chunks)}
    if len(peers) != 1:
        raise PipelineConfigError(f"rank {rank} mirrors more than one peer: {sorted(peers)}")
    return peers.pop()


def _chunks_by_stage(executor: MirrorHolder) -> list[int]:
    placement = executor.placement
    return sorted(range(placement.num_chunks), key=lambda chunk: placement.stage(executor.rank, chunk))


def mirrored_params(executor: MirrorHolder) -> tuple[int, list[torch.nn.Parameter]]:
    """The mirror peer of this rank and this rank's parameters in stage order (the peer lists the same)."""
    params = [p for chunk in _chunks_by_stage(executor) for p in executor.chunks[chunk].parameters() if p.requires_grad]
    return _mirror_peer(executor), params


def mirrored_buffers(executor: MirrorHolder) -> tuple[int, list[tuple[torch.Tensor, bool]]]:
    """The mirror peer of this rank and this rank's persistent buffers in stage order, each with whether this
    copy is the direction-0 one (the peer lists the same stages' buffers in the same order)."""
    placement, seen, buffers = executor.placement, set(), []
    for chunk in _chunks_by_stage(executor):
        direction0 = placement.flow_of(chunk) == 0
        for module in executor.chunks[chunk].modules():
            skipped = getattr(module, "_non_persistent_buffers_set", ())
            for name, buffer in module.named_buffers(recurse=False):
                if name not in skipped and id(buffer) not in seen:
                    seen.add(id(buffer))
                    buffers.append((buffer, direction0))
    return _mirror_peer(executor), buffers


def _swap(executor: MirrorHolder, peer: int, tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Send ``tensors`` to ``peer`` and return its tensors of the same shapes and dtypes (one message per
    dtype each way, waited under the pipeline's timeout)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    ops, buckets = [], []
    for dtype, indices in by_dtype.items():
        mine = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
        theirs = torch.empty_like(mine)
        label = f"the mirrored {str(dtype).removeprefix('torch.')} {what} ({mine.numel()} values)"
        ops += [P2P(True, mine, peer, Channel.GRADIENT, label), P2P(False, theirs, peer, Channel.GRADIENT, label)]
        buckets.append((indices, theirs))
    for work in executor.transport.start(ops):
        work.wait(executor.timeout_s)
    received: list[torch.Tensor | None] = [None] * len(tensors)
    for indices, theirs in buckets:
        offset = 0
        for i in indices:
            n = tensors[i].numel()
            received[i] = theirs[offset : offset + n].view_as(tensors[i])
            offset += n
    return received


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
    for param, grad, theirs in zip(params, grads, _swap(executor, peer, grads, "gradients")):
        summed = grad + theirs
        if grad_of is not None:
            grad.copy_(summed)
        elif param.grad is None:
            param.grad = summed
        else:
            param.grad.copy_(summed)


class MirroredBuffers:
    """Makes the buffers of both copies of every stage equal at the end of each step (the module docstring's
    rule). :meth:`begin` at a step's start remembers the integer buffers; :meth:`finish` at its end merges."""

    def __init__(self, executor: MirrorHolder):
        self._executor = executor
        self._start: dict[int, torch.Tensor] = {}

    def begin(self) -> None:
        _, buffers = mirrored_buffers(self._executor)
        self._start = {id(b): b.detach().clone() for b, _ in buffers if _integer(b)}

    def finish(self) -> None:
        peer, buffers = mirrored_buffers(self._executor)
        if peer == self._executor.rank or not buffers:
            return
        tensors = [b for b, _ in buffers]
        with torch.no_grad():
            for (buffer, direction0), theirs in zip(buffers, _swap(self._executor, peer, tensors, "buffers")):
                if buffer.is_floating_point() or buffer.is_complex():
                    buffer.copy_((buffer + theirs) / 2)
                elif _integer(buffer):
                    start = self._start.get(id(buffer))
                    # A buffer replaced during the step has no known start: the two copies' floor mean.
                    buffer.copy_(buffer + theirs - start if start is not None else (buffer + theirs) // 2)
                elif not direction0:
                    buffer.copy_(theirs)
        self._start = {}


def _integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
