"""The emulated device: real (small) math plus fixed sleeps, so schedules can be timed on a CPU box.

With 4-8 ranks on 2 cores, real compute makes the ranks fight for cores and timings say nothing about
the schedule. An :class:`EmulatedLayer` does its real Linear+tanh math (tiny) and then sleeps a fixed
time for its forward, its input-gradient part and its weight-gradient part. Sleeping uses no CPU, so the
ranks' "compute" truly runs in parallel, while point-to-point and all-to-all traffic stay real gloo
transfers. The simulator predicts the step from the same costs; measured / simulated is the runtime's
own overhead. Each part lasts its nominal time *including* its real math (the layer sleeps to a deadline
and spins the last 0.2 ms, since ``time.sleep`` overshoots), so the simulator's costs are the device's.
Used by benchmarks and the demo, never to fake a test result.

The weight-gradient sleep goes through the executor's W store like any split layer: it runs inside a
``W`` op when the schedule splits the backward, and inside ``B`` otherwise (so B = I + W).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dualpipe_plugin.runtime.weight_grad import WeightGradStore

__all__ = ["EmulatedCosts", "EmulatedLayer", "emulated_chunk"]


@dataclass(frozen=True, slots=True)
class EmulatedCosts:
    """Seconds slept per layer: forward, input-gradient part, weight-gradient part."""

    forward_s: float
    input_grad_s: float
    weight_grad_s: float

    @classmethod
    def per_layer(cls, forward_ms: float, backward_ms: float, weight_ms: float, layers: int) -> "EmulatedCosts":
        """Spread per-chunk costs (B is the full backward, I = B - W) over ``layers`` layers."""
        if weight_ms > backward_ms:
            raise ValueError(f"emulated W={weight_ms} ms exceeds B={backward_ms} ms; B is the full backward (I + W)")
        return cls(forward_ms / layers / 1e3, (backward_ms - weight_ms) / layers / 1e3, weight_ms / layers / 1e3)


_SPIN_S = 2e-4  # time.sleep overshoots by ~0.1 ms; sleep to just short of a deadline, then spin


def _wait_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        pass


class _ForwardEnd(torch.autograd.Function):
    """Closes the layer's forward at its deadline; in backward, opens the layer's input-grad window."""

    @staticmethod
    def forward(ctx, y, layer, started):
        ctx.layer = layer
        _wait_until(started + layer.costs.forward_s)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.layer.backward_started.append(time.perf_counter())
        return grad, None, None


class _BackwardEnd(torch.autograd.Function):
    """Identity at the layer's input: its backward runs last, closing the input-grad window on time
    and handing the weight-grad part to the W store."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        _wait_until(layer.backward_started.pop() + layer.costs.input_grad_s)
        if layer.costs.weight_grad_s > 0:

            def weight_pass():
                _wait_until(time.perf_counter() + layer.costs.weight_grad_s)
                return []

            if layer.store is None:
                weight_pass()
            else:
                layer.store.defer(weight_pass)
        return grad, None


class EmulatedLayer(nn.Module):
    """``Linear(dim, dim)`` + tanh whose forward, input-grad and weight-grad parts each last a fixed
    time, their real math included (the layer waits out only the remainder)."""

    def __init__(self, dim: int, costs: EmulatedCosts):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.costs = costs
        self.store: WeightGradStore | None = None
        self.backward_started: list[float] = []

    def bind_weight_grad_store(self, store: WeightGradStore | None) -> None:
        self.store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        if not torch.is_grad_enabled():
            y = torch.tanh(self.linear(x))
            _wait_until(started + self.costs.forward_s)
            return y
        if not x.requires_grad:  # the first layer on raw data: still give its backward a window
            x = x.detach().requires_grad_()
        y = torch.tanh(self.linear(_BackwardEnd.apply(x, self)))
        return _ForwardEnd.apply(y, self, started)


def emulated_chunk(dim: int, layers: int, forward_ms: float, backward_ms: float, weight_ms: float) -> nn.Sequential:
    """A chunk of ``layers`` emulated layers whose costs add up to the given per-chunk costs."""
    costs = EmulatedCosts.per_layer(forward_ms, backward_ms, weight_ms, layers)
    return nn.Sequential(*(EmulatedLayer(dim, costs) for _ in range(layers)))
