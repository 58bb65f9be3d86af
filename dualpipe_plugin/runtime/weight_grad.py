"""The B/W split: defer weight gradients from an ``I`` op to its ``W`` op, without globals.

How it works. Each executor owns one :class:`WeightGradStore`. Layers that can split their backward
call :meth:`WeightGradStore.defer` from inside their autograd ``backward`` with a closure that computes
their weight gradients; while an ``I`` op runs (:meth:`capture`) the closure is queued under that op's
(chunk, micro-batch), otherwise it runs at once (a full ``B``, or any use outside a pipeline). The ``W``
op (:meth:`flush`) runs the closures and hands the gradients to autograd as a backward from the
parameters themselves, so ``AccumulateGrad`` and every hook on it (DDP, ZeRO, Megatron's grad buffers)
see each gradient exactly once, as after a normal backward.

Deferral happens *inside* the layer's backward, not through ``torch.autograd.grad`` on inputs, so it also
works under activation checkpointing (DeepSpeed's checkpointing refuses ``autograd.grad``): the
recomputed forward uses the same layers and their backward defers in the same way.

Which layers split:

- every ``torch.nn.Linear`` (and subclass that keeps ``Linear.forward``) in the chunks, with no change to
  the user's model: :func:`bind_weight_split` swaps the instance's ``forward`` for one that runs
  :class:`_SplitLinear`, whose gradients are bit-identical to autograd's (same kernels, same order);
- any module with a ``bind_weight_grad_store(store)`` method (the emulated device, the MoE experts);
- everything else (norms, embeddings, a tied head calling ``F.linear`` itself) computes its weight
  gradients in ``I``, as in a full backward: correct, just not deferred.

A forward whose backward will be a full ``B`` has nothing to defer: the executor clears
:attr:`WeightGradStore.split_forwards` around it, and the swapped ``nn.Linear`` then runs plain
``F.linear``, so its weight gradients come out of the same autograd pass as in any backward instead of
one nested autograd call per layer. Clearing it is only ever an optimisation: a layer that ran plain
whose backward is captured after all computes its weight gradients in the ``I``, still exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WeightGradStore", "WeightSplitter", "bind_weight_split", "WeightSplitBinding", "accumulate_weight_grads",
]

GradClosure = Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]
"""Computes [(parameter, gradient), ...] for one layer."""


class WeightGradStore:
    """Queues of deferred weight-gradient closures, keyed by (chunk, micro-batch)."""

    def __init__(self) -> None:
        self.split_forwards = True
        """False while a forward runs whose backward is a full ``B`` (set by the executor): the swapped
        Linears run plain ``F.linear`` (see the module docstring)."""
        self._capturing: tuple[int, int] | None = None
        self._pending: dict[tuple[int, int], list[GradClosure]] = {}
        # Joins the graph of a split layer whose input needs no gradient (raw data into the first
        # Linear), so autograd still reaches it; it receives no gradient itself.
        self.anchor = torch.zeros((), requires_grad=True)

    @property
    def capturing(self) -> bool:
        return self._capturing is not None

    @contextmanager
    def capture(self, key: tuple[int, int]) -> Iterator[None]:
        """Within this block, :meth:`defer` queues closures under ``key`` instead of running them."""
        if self._capturing is not None:
            raise RuntimeError(f"weight-grad capture for {key} started inside the capture for {self._capturing}")
        self._capturing = key
        self._pending.setdefault(key, [])
        try:
            yield
        finally:
            self._capturing = None

    def defer(self, closure: GradClosure) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Queue ``closure`` while capturing and return None; otherwise run it and return its gradients
        (the caller accumulates them, e.g. with :func:`accumulate_weight_grads`)."""
        if self._capturing is not None:
            self._pending[self._capturing].append(closure)
            return None
        return closure()

    def has(self, key: tuple[int, int]) -> bool:
        return key in self._pending

    def flush(self, key: tuple[int, int]) -> None:
        """Run the deferred closures of ``key`` and accumulate their gradients through autograd."""
        closures = self._pending.pop(key, None)
        if closures is None:
            raise RuntimeError(f"W for chunk {key[0]} micro-batch {key[1]} has no pending I")
        summed: dict[int, list] = {}
        for closure in closures:
            for param, grad in closure():
                entry = summed.get(id(param))
                if entry is None:
                    summed[id(param)] = [param, grad]
                else:  # a parameter used twice in the chunk: sum before accumulating, as autograd does
                    entry[1] = entry[1] + grad
        accumulate_weight_grads([tuple(entry) for entry in summed.values()])

    def pending_keys(self) -> list[tuple[int, int]]:
        return list(self._pending)

    def clear(self) -> None:
        self._pending.clear()
        self._capturing = None


def accumulate_weight_grads(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Hand weight gradients to autograd as a backward from the parameters (fires their hooks once)."""
    if grads:
        params, values = zip(*grads)
        torch.autograd.backward(list(params), list(values))


def _autocast(x: torch.Tensor, tensors: tuple) -> tuple:
    """``tensors`` as ``torch.autocast`` hands them to a linear: floating ones (not float64) in the autocast
    dtype of ``x``'s device while autocast is on there, otherwise unchanged."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


class _SplitLinear(torch.autograd.Function):
    """``F.linear`` whose weight/bias gradients go through a :class:`WeightGradStore`.

    The parameters are passed inside a tuple, so autograd draws no edge to their ``AccumulateGrad``:
    an ``I`` must not touch them at all (hooks would fire with no gradient). Their gradients reach
    autograd later through :func:`accumulate_weight_grads`, at once for a full backward or in the ``W`` op.

    Under ``torch.autocast`` the inputs are cast as autocast casts a linear's (once, in forward) and the
    backward runs in that dtype, each gradient then cast back to its tensor's dtype, as autograd's
    ``ToCopyBackward`` does for the autocast casts.
    """

    @staticmethod
    def forward(ctx, x, anchor, params, store):
        weight, bias = params
        x_cast, weight_cast, bias_cast = _autocast(x, (x, weight, bias))
        ctx.save_for_backward(x_cast)
        ctx.params, ctx.cast_params, ctx.store = params, (weight_cast, bias_cast), store
        return F.linear(x_cast, weight_cast, bias_cast)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.params
        weight_cast, _ = ctx.cast_params
        grad_x = grad_out.matmul(weight_cast.detach()) if ctx.needs_input_grad[0] else None

        def weight_grads() -> list[tuple[torch.Tensor, torch.Tensor]]:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            grads = []
            if weight.requires_grad:
                grads.append((weight, flat_grad.t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype)))
            if bias is not None and bias.requires_grad:
                grads.append((bias, flat_grad.sum(0).to(bias.dtype)))
            return grads

        computed = ctx.store.defer(weight_grads)
        if computed is not None:
            accumulate_weight_grads(computed)
        return grad_x, None, None, None


def _split_linear_forward(module: nn.Linear, store: WeightGradStore):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if not torch.is_grad_enabled() or not trainable or not store.split_forwards:
            return F.linear(x, weight, bias)
        anchor = None if x.requires_grad else store.anchor
        return _SplitLinear.apply(x, anchor, (weight, bias), store)

    return forward


class _Binding(Protocol):
    def unbind(self) -> None: ...


WeightSplitter = Callable[[Iterable[nn.Module], "WeightGradStore"], _Binding]
"""Binds some layers of the chunks to a store and returns an undo handle: :func:`bind_weight_split` for
``nn.Linear``; adapters add their own (Megatron's parallel linears) through the executor."""


class WeightSplitBinding:
    """Undo handle of :func:`bind_weight_split`."""

    def __init__(self, patched: list[nn.Linear], bound: list[nn.Module]):
        self._patched, self._bound = patched, bound

    @property
    def num_split_linears(self) -> int:
        return len(self._patched)

    def unbind(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        for module in self._bound:
            module.bind_weight_grad_store(None)
        self._patched, self._bound = [], []


def bind_weight_split(modules: Iterable[nn.Module], store: WeightGradStore) -> WeightSplitBinding:
    """Route the weight gradients of every splittable layer in ``modules`` through ``store``."""
    patched, bound = [], []
    for root in modules:
        for module in root.modules():
            if hasattr(module, "bind_weight_grad_store"):
                module.bind_weight_grad_store(store)
                bound.append(module)
            elif isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
                if "forward" in module.__dict__:
                    continue  # already bound by another executor: leave it
                module.forward = _split_linear_forward(module, store)
                patched.append(module)
    return WeightSplitBinding(patched, bound)
