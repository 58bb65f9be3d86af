"""One hop of the pipeline group, measured on the real group: latency and bandwidth for the cost file.

Pipeline ranks 0 and 1 play ping-pong through the runtime's own
:class:`~dualpipe_plugin.runtime.transport.Transport` (activations one way, gradients back, as a pipeline
sends them). Each message leaves after the sender "computed" for ``gap_ms`` (it sleeps) while the
receiver, its receive posted long before, is blocked waiting for it: a pipeline's hop, wake-ups
included. Rank 1 holds each message ``gap_ms`` before it answers and reports how long it held it, so the
one-way time is half of (round trip - hold). The latency is the median one-way time of a small message;
the bandwidth comes from a large one: ``(large - small bytes) / (its one-way time - the latency)``.

Every pipeline rank must call :func:`measure_link` (the result reaches all of them); ranks past 1 only
wait for the others.
"""

from __future__ import annotations

import statistics
import time

import torch

from dualpipe_plugin.runtime.transport import P2P, Channel, Transport
from dualpipe_plugin.schedules.cost_file import LinkCost

__all__ = ["measure_link", "measure_link_locally"]


def _one_way_ms(transport: Transport, nbytes: int, repeats: int, gap_s: float, timeout_s: float) -> list[float]:
    count = max(2, nbytes // 8)
    out = torch.zeros(count, dtype=torch.float64, device=transport.device)
    back = torch.zeros(count, dtype=torch.float64, device=transport.device)
    times = []
    for _ in range(repeats):
        if transport.rank == 0:
            reply = transport.start([P2P(False, back, 1, Channel.GRADIENT, "the link probe's reply")])[0]
            time.sleep(gap_s)
            started = time.perf_counter()
            sent = transport.start([P2P(True, out, 1, Channel.ACTIVATION, "the link probe")])[0]
            reply.wait(timeout_s)
            round_trip = time.perf_counter() - started
            sent.wait(timeout_s)
            times.append((round_trip - float(back[0])) / 2 * 1e3)
        else:
            message = transport.start([P2P(False, out, 0, Channel.ACTIVATION, "the link probe")])[0]
            message.wait(timeout_s)
            arrived = time.perf_counter()
            time.sleep(gap_s)
            back[0] = time.perf_counter() - arrived  # the hold, measured up to the reply's launch
            transport.start([P2P(True, back, 0, Channel.GRADIENT, "the link probe's reply")])[0].wait(timeout_s)
    return times


def measure_link(
    transport: Transport,
    *,
    small_bytes: int = 1024,
    large_bytes: int = 4 << 20,
    repeats: int = 20,
    gap_ms: float = 5.0,
    timeout_s: float = 60.0,
) -> LinkCost:
    """Latency and bandwidth of one hop between pipeline ranks 0 and 1 (module docstring); every rank of
    the pipeline calls it and gets the same answer. A pipeline of one rank has no hop: zero, with a note."""
    if transport.size < 2:
        return LinkCost(note="not measured: a pipeline of one rank has no hop; edit latency_ms and "
                             "bandwidth_bytes_per_s, or run profile under torch.distributed")
    figures = torch.zeros(2, dtype=torch.float64, device=transport.device)
    if transport.rank < 2:
        small = _one_way_ms(transport, small_bytes, repeats, gap_ms / 1e3, timeout_s)
        large = _one_way_ms(transport, large_bytes, max(3, repeats // 4), gap_ms / 1e3, timeout_s)
        if transport.rank == 0:
            latency = statistics.median(small)
            extra = statistics.median(large) - latency
            figures[0] = latency
            figures[1] = (large_bytes - small_bytes) / extra * 1e3 if extra > 0 else 0.0
    transport.all_reduce_sum(figures, what="the link probe's result", timeout_s=timeout_s)
    latency, bandwidth = float(figures[0]), float(figures[1])
    return LinkCost(
        latency_ms=latency, bandwidth_bytes_per_s=bandwidth or None, measured=True,
        note=f"ping-pong between pipeline ranks 0 and 1, {repeats} x {small_bytes} B and {max(3, repeats // 4)} x "
             f"{large_bytes} B after {gap_ms:g} ms of compute, median one-way",
    )


def _probe_rank(rank: int, world_size: int, kwargs: dict) -> LinkCost:
    from dualpipe_plugin.runtime.transport import TorchTransport

    return measure_link(TorchTransport(list(range(world_size))), **kwargs)


def measure_link_locally(ranks: int = 2, **kwargs) -> LinkCost:
    """:func:`measure_link` on ``ranks`` local gloo processes (one machine's loopback: what a CPU run here
    pays per hop)."""
    from dualpipe_plugin.launch import run_local

    return run_local(_probe_rank, ranks, (kwargs,), timeout_s=120)[0]
