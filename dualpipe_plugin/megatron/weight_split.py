"""The B/W split for Megatron-Core's own linear layers, through the runtime's :class:`WeightGradStore`.

Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` are not ``nn.Linear``, so the runtime's
generic binding passes them by. :func:`bind_megatron_linears` gives each instance (while bound) an
``_forward_impl`` that runs :class:`_SplitParallelLinear`: the forward and the input gradient are
Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` (same matmuls in the same order, the
tensor-parallel all-reduce of the input gradient when ``allreduce_dgrad``), and the weight/bias gradients
go to ``store.defer`` — queued during an ``I`` op, computed at once otherwise (a full ``B``, a
forward-only step, or Megatron's own schedules using the same model). They reach the parameters through
autograd (:func:`~dualpipe_plugin.runtime.weight_grad.accumulate_weight_grads`), so Megatron DDP's
per-parameter hooks add them to ``main_grad`` exactly once per micro-batch. Gradients are bit-identical to
Megatron's (checked against its 1F1B in ``tests/megatron/test_schedule_fn.py``).

Left unsplit (their weight gradients are computed in ``I``, which is correct, just not deferred):
sequence-parallel layers (their weight gradient needs the all-gathered input again), frozen weights, the
output layer under ``defer_embedding_wgrad_compute`` (refused anyway), and Transformer Engine modules
(TE's own split, ``backward_dw``, needs ``delay_wgrad_compute``, which this adapter refuses: see the
README's limitations). Split layers ignore ``gradient_accumulation_fusion``: their weight gradient is
added to ``main_grad`` by the DDP hook rather than by the fused GEMM (same sum, one extra addition).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dualpipe_plugin.runtime.weight_grad import WeightGradStore, accumulate_weight_grads

__all__ = ["MegatronLinearSplit", "bind_megatron_linears"]


class _SplitParallelLinear(torch.autograd.Function):
    """Megatron's linear (no sequence parallelism) with its weight gradients routed through a store.

    The weight and bias travel inside a tuple so autograd draws no edge to their ``AccumulateGrad``: an
    ``I`` must not touch them (DDP's hooks would fire without a gradient).
    """

    @staticmethod
    def forward(ctx, input, anchor, params, store, allreduce_dgrad, tp_group):
        weight, bias = params
        ctx.save_for_backward(input)
        ctx.params, ctx.store = params, store
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        output = torch.matmul(input, weight.t())  # as Megatron: matmul(total_input, weight.t()) + bias
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        from megatron.core.utils import prepare_input_tensors_for_wgrad_compute

        (input,) = ctx.saved_tensors
        weight, bias = ctx.params
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight.detach())
            if ctx.allreduce_dgrad:
                torch.distributed.all_reduce(grad_input, group=ctx.tp_group)

        def weight_grads() -> list[tuple[torch.Tensor, torch.Tensor]]:
            flat_grad, flat_input = prepare_input_tensors_for_wgrad_compute(grad_output, input)
            grads = []
            if weight.requires_grad:
                grads.append((weight, flat_grad.t().matmul(flat_input)))
            if bias is not None and bias.requires_grad:
                grads.append((bias, flat_grad.sum(dim=0)))
            return grads

        computed = ctx.store.defer(weight_grads)
        if computed is not None:
            accumulate_weight_grads(computed)
        return grad_input, None, None, None, None, None


def _split_forward_impl(module: nn.Module, store: WeightGradStore, original):
    def _forward_impl(input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None,
                      **kwargs):
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        if sequence_parallel or grad_output_buffer is not None or not trainable or not torch.is_grad_enabled():
            return original(input, weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
                            tp_group=tp_group, **kwargs)
        if allreduce_dgrad:
            from megatron.core.utils import get_tensor_model_parallel_group_if_none

            tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        anchor = None if input.requires_grad else store.anchor
        return _SplitParallelLinear.apply(input, anchor, (weight, bias), store, allreduce_dgrad, tp_group)

    return _forward_impl


class MegatronLinearSplit:
    """Undo handle of :func:`bind_megatron_linears`."""

    def __init__(self, modules: list[nn.Module]):
        self._modules = modules

    @property
    def num_split_linears(self) -> int:
        return len(self._modules)

    def unbind(self) -> None:
        for module in self._modules:
            module.__dict__.pop("_forward_impl", None)
        self._modules = []


def bind_megatron_linears(chunks: Iterable[nn.Module], store: WeightGradStore) -> MegatronLinearSplit:
    """Route the weight gradients of every Megatron parallel linear layer in ``chunks`` through ``store``."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    bound = []
    for root in chunks:
        for module in root.modules():
            for cls in (ColumnParallelLinear, RowParallelLinear):
                if isinstance(module, cls) and type(module)._forward_impl is cls._forward_impl:
                    if "_forward_impl" in module.__dict__:
                        break  # bound by another pipeline already
                    module._forward_impl = _split_forward_impl(module, store, cls._forward_impl.__get__(module))
                    bound.append(module)
                    break
    return MegatronLinearSplit(bound)
