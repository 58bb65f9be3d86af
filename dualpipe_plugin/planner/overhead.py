"""The runtime's own time per action on this machine: what the executor adds around the layers' work.

The profiler times each layer alone. In a pipeline every action also pays the executor's loop, its
bookkeeping, launching its transfers and the first instructions after a wait or a sleep (slow on a CPU
whose cores idled: caches gone cold), and that differs by op kind (a ``W`` runs the deferred closures, an
``I`` captures them). Two ways to measure it, both with the real
:class:`~dualpipe_plugin.runtime.pipeline.DualPipeline` and the executor's own record of each action:

* :func:`measure_action_overhead_on_group` (under ``torch.distributed``; ``..._locally`` spawns local
  processes): the model cut uniformly into one stage per pipeline rank, 1F1B (F, B actions) and ZB1P
  (F, I, W) steps on the real group, every rank as busy as in a step. An action's overhead is its busy
  span (its receive waits left out, as in the record) less its stage's profiled time for that op; the
  median per kind on each rank, averaged over the ranks. This is the figure the simulator needs: on this
  2-core box it puts dualpipe, dualpipev, 1f1b and zb1p within 2% of their measured steps
  (``benchmarks/planner_calibration.py``).
* :func:`measure_action_overhead` (no group): one-rank pipelines over all the layers on this process, no
  transfers. An action's overhead is its recorded span plus the loop's time before it, less the layers'
  profiled time. Only a fallback: alone, a process sees neither the other ranks' load nor a transfer, and
  its figures wander from run to run (B 0 to 2 ms on the emulated model here).

Transfers themselves are the link's part (:mod:`~dualpipe_plugin.planner.link`).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.schedules.cost_file import CostProfile, LayerCost, Runtime
from dualpipe_plugin.schedules.cuts import uniform_bounds

__all__ = ["measure_action_overhead", "measure_action_overhead_on_group", "measure_action_overhead_locally"]

_KINDS = "FIWB"


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


def _chunk_loss(loss: Callable[[Any], torch.Tensor] | None):
    """The pipeline's ``loss_fn(*outputs, labels)`` for a row whose last layer's output feeds ``loss``."""

    def loss_fn(*values):
        outputs = values[:-1]
        output = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if loss is not None:
            return loss(output)
        return sum(t.float().mean() for t in outputs if t.is_floating_point())

    return loss_fn


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
    loss_fn = _chunk_loss(loss)
    layer_time = _stage_time(costs)
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
    overhead = {kind: max(0.0, statistics.median(excess[kind])) for kind in _KINDS}
    return Runtime(**overhead, note=f"one-rank 1F1B and ZB1P runs over all the layers on one process, {microbatches} "
                                    f"micro-batches, median excess per action kind (no transfers, no other ranks)")


def _stage_time(costs: Sequence[LayerCost]) -> dict[str, float]:
    return {"F": sum(c.forward_ms for c in costs), "B": sum(c.backward_ms for c in costs),
            "I": sum(c.input_grad_ms for c in costs), "W": sum(c.weight_grad_ms for c in costs)}


def measure_action_overhead_on_group(
    target: Any,
    costs: Sequence[LayerCost],
    transport: Any,
    *,
    microbatches: int | None = None,
    steps: int = 3,
    warmup: int = 1,
) -> Runtime:
    """Milliseconds the executor adds to each action of each kind on the pipeline group of ``transport``
    (module docstring). ``target`` is the :class:`~dualpipe_plugin.planner.profile.ProfileTarget` whose
    layers ``costs`` profiled; every rank of the group calls this with its own copy of the model and gets the
    same answer. A group of one rank, or a model of fewer cuttable units than ranks, falls back to
    :func:`measure_action_overhead`."""
    ranks, rank = transport.size, transport.rank
    profile = CostProfile(layers=tuple(costs))
    units = profile.unit_spans()
    if ranks < 2 or len(units) < ranks:
        return measure_action_overhead(target.layers, target.inputs, costs, loss=target.loss, steps=steps,
                                       warmup=warmup)
    bounds = profile.layer_bounds(uniform_bounds(len(units), ranks))
    start, stop = bounds[rank], bounds[rank + 1]
    row = _Row(target.layers[start:stop])
    stage_time = _stage_time(costs[start:stop])
    device = transport.device
    count = microbatches or 2 * ranks
    inputs = _batch(target.inputs, count) if rank == 0 else None
    labels = torch.zeros(count, device=device) if rank == ranks - 1 else None
    excess: dict[str, list[float]] = {}
    for schedule in ("1f1b", "zb1p"):
        pipe = DualPipeline([row], schedule, loss_fn=_chunk_loss(target.loss), transport=transport, overlap=False)
        try:
            for step in range(warmup + steps):
                row.zero_grad(set_to_none=True)
                result = pipe.step(inputs, labels, num_microbatches=count, reduce_loss=False,
                                   record=step >= warmup)
                for action, began, ended in result.timeline:
                    kind = str(action)[0]
                    excess.setdefault(kind, []).append(ended - began - stage_time[kind])
        finally:
            pipe.close()
            row.zero_grad(set_to_none=True)
    figures = torch.tensor([statistics.median(excess[kind]) for kind in _KINDS], dtype=torch.float64, device=device)
    transport.all_reduce_sum(figures, what="the runtime overhead probe's result", timeout_s=120.0)
    return Runtime(**{kind: max(0.0, float(value) / ranks) for kind, value in zip(_KINDS, figures)},
                   note=f"measured on the pipeline group of {ranks} ranks: the model cut into {ranks} stages, 1F1B and "
                        f"ZB1P steps of {count} micro-batches, median excess per action kind, mean over the ranks")


def _local_rank(rank: int, world_size: int, make_target: Callable[[], Any], costs: Sequence[LayerCost],
                kwargs: dict) -> Runtime:
    from dualpipe_plugin.runtime.transport import TorchTransport

    torch.set_num_threads(1)
    return measure_action_overhead_on_group(make_target(), costs, TorchTransport(list(range(world_size))), **kwargs)


def measure_action_overhead_locally(make_target: Callable[[], Any], costs: Sequence[LayerCost], ranks: int,
                                    **kwargs) -> Runtime:
    """:func:`measure_action_overhead_on_group` on ``ranks`` local gloo processes, each building the model
    with ``make_target()`` (a picklable callable returning the ProfileTarget ``costs`` profiled)."""
    from dualpipe_plugin.launch import run_local

    return run_local(_local_rank, ranks, (make_target, tuple(costs), kwargs), timeout_s=600)[0]
