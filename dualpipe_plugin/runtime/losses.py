"""Where a step's losses end up: the runtime's one way of moving them to the ranks that report them.

A micro-batch's loss is computed on the rank holding the last stage of its route: rank P-1 for 1F1B and
ZB1P, rank 0 for a V (DualPipeV, ZB-V), ranks 0 and P-1 for DualPipe's two directions
(:meth:`~dualpipe_plugin.schedules.Placement.last_stage_ranks`). Frameworks report them elsewhere:

* :func:`collect_to` moves any per-micro-batch values (losses, DeepSpeed's additional losses, Megatron's
  ``forward_data_store`` reports) from the loss ranks to one pipeline rank, pickled over the pipeline's
  own point-to-point links, so every wait has the pipeline's timeout and a dead peer is named. Ranks
  that hold no loss send nothing; the destination gets a dict in micro-batch order.
* :func:`total_loss` sums the losses of all ranks into every rank with one sum over the ranks (the
  transport's ``all_reduce_sum``, which names a dead or stuck rank), together with the count of
  non-finite ones (the standalone API's ``result.loss`` and ``detect_nonfinite``).
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Mapping, Sequence

import torch

from dualpipe_plugin.runtime.transport import P2P, Channel, Transport

__all__ = ["collect_to", "total_loss", "map_tensors"]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside dicts, lists, tuples and named tuples."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((key, map_tensors(item, fn)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        mapped = [map_tensors(item, fn) for item in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    return value


def collect_to(
    transport: Transport,
    values: Mapping[int, Any],
    *,
    to: int,
    senders: Sequence[int],
    timeout_s: float,
    what: str = "the losses of this step",
) -> dict[int, Any] | None:
    """Gather ``values`` (micro-batch -> picklable value) of every rank in ``senders`` onto pipeline rank
    ``to``; returns them merged in micro-batch order there, None on every other rank. Every rank of the
    pipeline calls it; ranks neither in ``senders`` nor ``to`` return at once."""
    rank = transport.rank
    if rank != to:
        if rank in senders:
            payload = pickle.dumps(map_tensors(dict(values), lambda t: t.detach().cpu()))
            _send_bytes(transport, payload, to, timeout_s, what)
        return None
    merged = dict(values)
    for sender in senders:
        if sender == to:
            continue
        received = pickle.loads(_recv_bytes(transport, sender, timeout_s, what))
        merged.update(map_tensors(received, lambda t: t.to(transport.device)))
    return {microbatch: merged[microbatch] for microbatch in sorted(merged)}


def total_loss(
    transport: Transport, losses: Mapping[int, torch.Tensor], *, timeout_s: float
) -> tuple[torch.Tensor, int]:
    """(sum of every rank's micro-batch losses in float64, number of non-finite ones), on every rank."""
    local = torch.zeros(2, dtype=torch.float64)
    for value in losses.values():
        local[0] += value.double().cpu()
        local[1] += 0 if bool(torch.isfinite(value).all()) else 1
    summed = local.to(transport.device)
    transport.all_reduce_sum(summed, what="the step's loss total", timeout_s=timeout_s)
    summed = summed.cpu()
    return summed[0], int(summed[1])


def _send_bytes(transport: Transport, payload: bytes, peer: int, timeout_s: float, what: str) -> None:
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(transport.device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=transport.device)
    for tensor in (size, data):
        for work in transport.start([P2P(True, tensor, peer, Channel.GRADIENT, what)]):
            work.wait(timeout_s)


def _recv_bytes(transport: Transport, peer: int, timeout_s: float, what: str) -> bytes:
    size = torch.zeros(1, dtype=torch.int64, device=transport.device)
    for work in transport.start([P2P(False, size, peer, Channel.GRADIENT, what)]):
        work.wait(timeout_s)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=transport.device)
    for work in transport.start([P2P(False, data, peer, Channel.GRADIENT, what)]):
        work.wait(timeout_s)
    return data.cpu().numpy().tobytes()
