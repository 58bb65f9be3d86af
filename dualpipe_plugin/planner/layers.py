"""Profiling a model given as a row of layers: per layer F, I, W and B time and every byte that matters.

Each layer runs alone, in model order, on the output of the layer before (the first on the user's
micro-batch), exactly as a pipeline chunk runs it: the runtime's B/W split is bound to the layer
(:func:`~dualpipe_plugin.runtime.weight_grad.bind_weight_split` plus any adapter's splitters), the
backward runs once under the weight-gradient store's capture (``I``), then the store's flush (``W``),
then once whole (``B``), after a forward with the split Linears plain, as the executor runs a forward
whose backward is a full B. Every time is the median of ``repeats`` runs after ``warmup`` runs.

Bytes, from a run of their own before the timed ones (the meter's hooks cost time), with a
:class:`~dualpipe_plugin.planner.meter.SavedTensorMeter`:
``activation_bytes`` (saved by the forward), ``saves_input_bytes`` / ``saves_output_bytes`` (of those, the
layer's own input / output: shared with a neighbour inside a stage), ``w_store_bytes`` (still held after
``I``: the split layers' inputs and output gradients), ``output_bytes`` (what a cut after the layer
sends), parameters, gradients and the optimizer's state (one optimizer step on a copy of the
parameters' values, which are put back).

Call convention: ``output = layer(input)`` with one object in and out (a tensor or a tuple of tensors),
as in ``nn.Sequential`` and DeepSpeed's PipelineModule. The last layer's forward includes ``loss_fn``
when one is given, as a pipeline's last stage computes its loss.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dualpipe_plugin.planner.meter import SavedTensorMeter, tensors_in
from dualpipe_plugin.runtime.weight_grad import WeightGradStore, WeightSplitter, bind_weight_split
from dualpipe_plugin.schedules.cost_file import LayerCost

__all__ = ["profile_layer_row", "layer_parameters", "default_optimizer", "OptimizerFactory"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
_KEY = (0, 0)  # the store key the profiler's I and W use


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW: two moments per parameter (the state the planner counts unless told otherwise)."""
    return torch.optim.AdamW(params, lr=1e-3)


def _modules(layer: Any) -> list[nn.Module]:
    """The modules a layer runs: itself, or those a partial is bound to (a DeepSpeed tied ``forward_fn``)."""
    if isinstance(layer, nn.Module):
        return [layer]
    if isinstance(layer, functools.partial):
        return [a for a in (*layer.args, *layer.keywords.values()) if isinstance(a, nn.Module)]
    return []


def layer_parameters(layer: Any) -> list[nn.Parameter]:
    """Distinct parameters of a layer's modules."""
    seen: dict[int, nn.Parameter] = {}
    for module in _modules(layer):
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def _flat(values: Any) -> list[torch.Tensor]:
    return list(tensors_in(values))


def _fresh_input(values: Any) -> Any:
    """A copy of a layer's input as a pipeline stage receives it: new leaves, floating ones needing grad."""
    if isinstance(values, torch.Tensor):
        copy = values.detach().clone()
        return copy.requires_grad_() if copy.is_floating_point() else copy
    if isinstance(values, (tuple, list)):
        return type(values)(_fresh_input(v) for v in values)
    return values


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _param_bytes(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _optimizer_bytes(params: list[nn.Parameter], factory: OptimizerFactory) -> int:
    """State bytes ``factory`` keeps for ``params`` after one step (the values are restored after it)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return 0
    saved = [(p, p.detach().clone(), p.grad) for p in trainable]
    try:
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer = factory(trainable)
        optimizer.step()
        total = 0
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        return total
    finally:
        with torch.no_grad():
            for p, value, grad in saved:
                p.copy_(value)
                p.grad = grad


def _roots(outputs: Any, loss: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    if loss is not None:
        return [loss], [None]
    roots = [t for t in _flat(outputs) if t.requires_grad]
    generator = torch.Generator(device="cpu").manual_seed(0)
    grads = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in roots]
    return roots, grads


def _profile_one(
    name: str, layer: Any, inputs: Any, *, loss: Callable[[Any], torch.Tensor] | None, repeats: int, warmup: int,
    splitters: Sequence[WeightSplitter], split_weights: bool, optimizer: OptimizerFactory, exclude_inputs: bool,
) -> tuple[LayerCost, Any]:
    params = layer_parameters(layer)
    store = WeightGradStore()
    bindings = [bind(_modules(layer), store) for bind in (bind_weight_split, *splitters)] if split_weights else []
    times: dict[str, list[float]] = {"F": [], "I": [], "W": [], "B": []}
    sizes: dict[str, int] = {}
    output_value = None
    try:
        # Run 0 measures the bytes and is not timed (the meter's hooks cost time); then warmup, then repeats.
        for run in range(1 + warmup + repeats):
            metered, measured = run == 0, run > warmup
            meter = SavedTensorMeter(exclude=params) if metered else None
            x = _fresh_input(inputs)
            if metered:
                meter.watch_store(store)
                if exclude_inputs:
                    meter.exclude(_flat(x))
            for p in params:
                p.grad = None
            with meter.counting() if metered else contextlib.nullcontext():
                t0 = time.perf_counter()
                y = layer(x)
                value = loss(y) if loss is not None else None
                t1 = time.perf_counter()
            if metered:
                counted = meter.counted_bytes
                sizes["activation"] = meter.live
                sizes["saves_input"] = counted(_flat(x))
                sizes["saves_output"] = counted(_flat(y))
                sizes["output"] = _nbytes(_flat(y))
                output_value = _detached(y, copy=True)  # a copy: holding y would keep its saved storage
            roots, grads = _roots(y, value)
            del y, value
            with store.capture(_KEY):
                t2 = time.perf_counter()
                if roots:
                    torch.autograd.backward(roots, grads)
                t3 = time.perf_counter()
            del roots, grads, x
            if metered:
                sizes["w_store"] = meter.live
            t4 = time.perf_counter()
            if store.has(_KEY):
                store.flush(_KEY)
            t5 = time.perf_counter()
            if metered:
                meter.unwatch_store(store)
            # The whole backward in one op, as a B runs it: its forward with the split Linears plain, as the
            # executor runs a forward whose backward is a full B (deferred closures run at once outside a capture).
            x = _fresh_input(inputs)
            store.split_forwards = False
            try:
                y = layer(x)
                value = loss(y) if loss is not None else None
            finally:
                store.split_forwards = True
            roots, grads = _roots(y, value)
            del y, value
            t6 = time.perf_counter()
            if roots:
                torch.autograd.backward(roots, grads)
            t7 = time.perf_counter()
            if measured:
                for key, spent in (("F", t1 - t0), ("I", t3 - t2), ("W", t5 - t4), ("B", t7 - t6)):
                    times[key].append(spent * 1e3)
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() if p.grad is not None
                         else p.numel() * p.element_size() for p in params if p.requires_grad)
    finally:
        for binding in reversed(bindings):
            binding.unbind()
    median = {key: statistics.median(values) for key, values in times.items()}
    cost = LayerCost(
        name=name, forward_ms=median["F"], input_grad_ms=median["I"], weight_grad_ms=median["W"],
        backward_ms=median["B"], activation_bytes=sizes["activation"], saves_input_bytes=sizes["saves_input"],
        saves_output_bytes=sizes["saves_output"], w_store_bytes=sizes["w_store"], output_bytes=sizes["output"],
        param_bytes=_param_bytes(params), grad_bytes=grad_bytes,
        optimizer_bytes=_optimizer_bytes(params, optimizer),
    )
    for p in params:
        p.grad = None
    return cost, output_value


def profile_layer_row(
    layers: Sequence[Any],
    inputs: Any,
    *,
    names: Sequence[str] | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    split_weights: bool = True,
    weight_splitters: Sequence[WeightSplitter] = (),
    optimizer: OptimizerFactory = default_optimizer,
) -> list[LayerCost]:
    """Profile every layer in order (see the module docstring); ``loss(output)`` ends the last layer."""
    names = list(names) if names is not None else [f"{i}: {type(layer).__name__}" for i, layer in enumerate(layers)]
    costs = []
    x = inputs
    for index, layer in enumerate(layers):
        last = index == len(layers) - 1
        cost, y = _profile_one(
            names[index], layer, x, loss=loss if last else None, repeats=repeats, warmup=warmup,
            splitters=weight_splitters, split_weights=split_weights, optimizer=optimizer, exclude_inputs=index == 0,
        )
        costs.append(cost)
        x = y
    return costs


def _detached(values: Any, copy: bool = False) -> Any:
    if isinstance(values, torch.Tensor):
        return values.detach().clone() if copy else values.detach()
    if isinstance(values, (tuple, list)):
        return type(values)(_detached(v, copy) for v in values)
    return values

