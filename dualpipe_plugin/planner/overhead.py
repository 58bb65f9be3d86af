"""The runtime's own time per action on this machine: what the executor adds around the layers' work.

The profiler times each layer alone. In a pipeline every action also pays the executor's loop, its
bookkeeping and the first instructions after a wait or a sleep (slow on a CPU whose cores idled: caches
gone cold), and that differs by op kind (a ``W`` runs the deferred closures, an ``I`` captures them).
:func:`measure_action_overhead` runs the real :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline` on
this process as one-rank pipelines over the profiled layers, 1F1B (F, B actions) and ZB1P (F, I, W), with
the executor's own record of each action (no transfers: a pipeline of one rank has none). An action's
overhead is its recorded span plus the loop's time before it, less the layers' profiled time for that
op; the median per kind is kept. Transfers are the link's part (:mod:`~dualpipe_plugin.planner.link`).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.schedules.cost_file import LayerCost, Runtime

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


def _excess_per_kind(timeline: list, layer_time: dict[str, float]) -> dict[str, list[float]]:
    excess: dict[str, list[float]] = {}
    previous_end = None
    for action, start, end in timeline:
        kind = str(action)[0]
        gap = start - previous_end if previous_end is not None else 0.0
        excess.setdefault(kind, []).append(end - start + gap - layer_time[kind])
        previous_end = end
    return excess


def measure_action_overhead(
    layers: Sequence[Any],
    inputs: Any,
    costs: Sequence[LayerCost],
    *,
    loss: Callable[[Any], torch.Tensor] | None = None,
    microbatches: int = 8,
    steps: int = 3,
    warmup: int = 1,
) -> Runtime:
    """Milliseconds the executor adds to each action of each kind (>= 0; see the module docstring)."""
    row = _Row(layers)
    device = next((p.device for p in row.parameters()), torch.device("cpu"))
    labels = torch.zeros(microbatches, device=device)

    def loss_fn(*values):
        outputs = values[:-1]
        output = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if loss is not None:
            return loss(output)
        return sum(t.float().mean() for t in outputs if t.is_floating_point())

    layer_time = {
        "F": sum(c.forward_ms for c in costs), "B": sum(c.backward_ms for c in costs),
        "I": sum(c.input_grad_ms for c in costs), "W": sum(c.weight_grad_ms for c in costs),
    }
    batch = _batch(inputs, microbatches)
    excess: dict[str, list[float]] = {}
    for schedule in ("1f1b", "zb1p"):
        pipe = DualPipeline([row], schedule, loss_fn=loss_fn, transport=_SoloTransport(device), overlap=False)
        try:
            for step in range(warmup + steps):
                row.zero_grad(set_to_none=True)
                result = pipe.step(batch, labels, num_microbatches=microbatches, reduce_loss=False,
                                   record=step >= warmup)
                for kind, values in _excess_per_kind(result.timeline, layer_time).items():
                    excess.setdefault(kind, []).extend(values)
        finally:
            pipe.close()
            row.zero_grad(set_to_none=True)
    overhead = {kind: max(0.0, statistics.median(excess[kind])) for kind in "FIWB"}
    return Runtime(**overhead)
