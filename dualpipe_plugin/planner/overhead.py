"""The runtime's own time per action on this machine: what the executor adds around the layers' work.

The profiler times each layer alone. In a pipeline every action also pays the executor's loop, its
bookkeeping and the first instructions after a wait (slow on a CPU whose cores idled: caches gone cold).
:func:`measure_action_overhead` runs the real :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline` on
this process as a one-rank 1F1B pipeline over the profiled layers (no transfers: a pipeline of one rank
has none) and charges what the step takes beyond the layers' profiled F and B to its actions evenly.
Transfers are the link's part (:mod:`~dualpipe_plugin.planner.link`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.schedules.cost_file import LayerCost

__all__ = ["measure_action_overhead"]


class _SoloTransport:
    """The transport of a pipeline of one rank: no peer, so nothing is ever sent."""

    rank = 0
    size = 1

    def __init__(self, device: torch.device):
        self.device = device

    def start(self, ops):
        if ops:
            raise PipelineConfigError("a one-rank pipeline has no peer to send to")
        return []

    def all_reduce_sum(self, tensor, *, what: str = "", timeout_s: float | None = None) -> None:
        return None

    def barrier(self, *, what: str = "", timeout_s: float | None = None) -> None:
        return None


class _Row(nn.Module):
    """The layers as one chunk, called ``x = layer(x)`` in turn."""

    def __init__(self, layers: Sequence[Any]):
        super().__init__()
        self.layers = list(layers)
        self.modules_ = nn.ModuleList([layer for layer in layers if isinstance(layer, nn.Module)])

    def forward(self, *inputs: Any) -> Any:
        x = inputs[0] if len(inputs) == 1 else inputs  # the executor passes a tuple's tensors as arguments
        for layer in self.layers:
            x = layer(x)
        return x


def _batch(inputs: Any, copies: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return torch.cat([inputs] * copies)
    return tuple(torch.cat([t] * copies) for t in inputs)


def measure_action_overhead(
    layers: Sequence[Any],
    inputs: Any,
    costs: Sequence[LayerCost],
    *,
    loss: Callable[[Any], torch.Tensor] | None = None,
    microbatches: int = 8,
    steps: int = 3,
    warmup: int = 1,
) -> float:
    """Milliseconds the executor adds to each action (>= 0), from a one-rank 1F1B run (module docstring)."""
    row = _Row(layers)
    device = next((p.device for p in row.parameters()), torch.device("cpu"))
    labels = torch.zeros(microbatches, device=device)

    def loss_fn(*values):
        outputs = values[:-1]
        output = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if loss is not None:
            return loss(output)
        return sum(t.float().mean() for t in outputs if t.is_floating_point())

    pipe = DualPipeline([row], "1f1b", loss_fn=loss_fn, transport=_SoloTransport(device))
    batch = _batch(inputs, microbatches)
    spent = []
    try:
        for step in range(warmup + steps):
            row.zero_grad(set_to_none=True)
            started = time.perf_counter()
            pipe.step(batch, labels, num_microbatches=microbatches, reduce_loss=False)
            if step >= warmup:
                spent.append((time.perf_counter() - started) * 1e3)
    finally:
        pipe.close()
        row.zero_grad(set_to_none=True)
    work = microbatches * sum(c.forward_ms + c.backward_ms for c in costs)
    return max(0.0, (statistics.median(spent) - work) / (2 * microbatches))
