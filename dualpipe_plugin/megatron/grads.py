"""Gradient synchronisation around one pipeline step, in Megatron's conventions.

Order within a training step (what :class:`~dualpipe_plugin.megatron.schedule_fn.PipelineScheduleFunction`
does, next to what Megatron's schedules do)::

    config.param_sync_func per chunk        (only if set: the distributed optimizer's param all-gather)
    enter config.no_sync_func               (every chunk; DDP hooks accumulate into main_grad, no reduction)
      the schedule (PipelineExecutor.run)
      DualPipe mirror sync on main_grad     (rank r <-> P-1-r; inside no_sync, before any DP reduction)
    exit no_sync
    tied word embedding: local sum         (V: rank 0; DualPipe: ranks 0 and P-1)
    launch the DP grad reduction            (config.grad_sync_func, or start_grad_sync of DDP chunks with
                                             overlap_grad_reduce; without overlap finalize does it)
    config.finalize_model_grads_func(model, num_tokens, pg_collection=..., force_all_reduce=...)

Differences from Megatron's schedules, and why:

- Grad sync stays disabled for the whole step and the DP reduction starts after the last backward, not
  during the last micro-batch's backward. With the B/W split a chunk's parameters receive gradients in
  several ops per micro-batch (I for norms and embeddings, W for linears), and W ops of earlier
  micro-batches can run after the last micro-batch's I, so there is no single "last backward" in which
  every parameter is touched exactly once, which is what Megatron's ``register_grad_ready`` counting needs.
  Consequence: with ``overlap_grad_reduce`` the DP reduction is not overlapped with pipeline compute.
- For dualpipe/dualpipev, ``finalize_model_grads`` gets a ``pg_collection`` whose embedding and
  position-embedding groups are groups of one, so its embedding all-reduce (first pipeline rank + last
  pipeline rank) is skipped: both ends of a V live on rank 0, and DualPipe's end ranks each hold both
  ends. The tied embedding is summed locally here instead and, for DualPipe, across the mirror pair by the
  mirror sync. Sum of the same terms as Megatron's all-reduce; order may differ by an ulp.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from dualpipe_plugin.megatron.placement import ModelPlacement, tied_embedding_pairs
from dualpipe_plugin.runtime.mirror import sync_mirrored_grads

if TYPE_CHECKING:
    from dualpipe_plugin.runtime.executor import PipelineExecutor

__all__ = ["GradSync", "grad_buffer"]


def grad_buffer(param: torch.nn.Parameter) -> torch.Tensor:
    """Where this parameter's gradient accumulates: Megatron DDP's ``main_grad``, else ``.grad``."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        return main_grad
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class _GroupOfOne:
    """Stands for a process group of size 1: ``finalize_model_grads`` skips its embedding all-reduce for
    groups of size 1 (``None`` would make it fall back to parallel_state's embedding group instead)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _overlaps_grad_reduce(chunk: Any) -> bool:
    ddp_config = getattr(chunk, "ddp_config", None)
    return bool(getattr(ddp_config, "overlap_grad_reduce", False))


class GradSync:
    """The gradient hooks of one model (its chunks on this rank) for one schedule."""

    def __init__(self, chunks: Sequence[Any], config: Any, placement: ModelPlacement | None):
        self.chunks = list(chunks)
        self.config = config
        self.placement = placement
        self.tied = tied_embedding_pairs(self.chunks) if placement is not None else []

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Megatron's ``config.no_sync_func`` (one, or one per chunk); DDP chunks' own ``no_sync`` when unset."""
        funcs = _as_list(self.config.no_sync_func)
        if not funcs:
            funcs = [chunk.no_sync for chunk in self.chunks if hasattr(chunk, "no_sync")]
        with ExitStack() as stack:
            for func in funcs:
                stack.enter_context(func())
            yield

    def param_sync(self) -> None:
        """``config.param_sync_func`` for every chunk before the first forward (when set)."""
        funcs = _as_list(self.config.param_sync_func)
        if len(funcs) == 1 and len(self.chunks) > 1:
            funcs[0]([p for chunk in self.chunks for p in chunk.parameters()])
            return
        for func, chunk in zip(funcs, self.chunks):
            func(chunk.parameters())

    def mirror_sync(self, executor: "PipelineExecutor") -> None:
        """DualPipe: sum every stage's gradient with its copy on rank P-1-r (the executor's mirror hook)."""
        sync_mirrored_grads(executor, grad_of=grad_buffer)

    def tie_embeddings(self) -> None:
        """Sum the gradients of the word embedding and the output layer's copy on this rank, into both."""
        for embedding, output in self.tied:
            a, b = grad_buffer(embedding), grad_buffer(output)
            total = a + b
            a.copy_(total)
            b.copy_(total)

    def launch_grad_reduction(self) -> None:
        """Start the DP reduction as Megatron's schedules do at their end (see the module docstring)."""
        funcs = _as_list(self.config.grad_sync_func)
        if funcs:
            if len(funcs) == 1 and len(self.chunks) > 1:
                funcs[0]([p for chunk in self.chunks for p in chunk.parameters()])
            else:
                for func, chunk in zip(funcs, self.chunks):
                    func(chunk.parameters())
            return
        for chunk in self.chunks:
            if _overlaps_grad_reduce(chunk):
                chunk.start_grad_sync()

    def finalize(self, num_tokens: torch.Tensor | None, pg_collection: Any, force_all_reduce: bool) -> None:
        """``config.finalize_model_grads_func`` as Megatron's schedules call it (skipped when unset)."""
        finalize = self.config.finalize_model_grads_func
        if finalize is None:
            return
        finalize(self.chunks, num_tokens, pg_collection=self._pg_collection(pg_collection),
                 force_all_reduce=force_all_reduce)

    def _pg_collection(self, pg_collection: Any) -> Any:
        if pg_collection is None:
            pg_collection = megatron_pg_collection()
        if self.placement is None:
            return pg_collection
        ours = copy.copy(pg_collection)
        ours.embd = _GroupOfOne()
        ours.pos_embd = _GroupOfOne()
        return ours


def megatron_pg_collection() -> Any:
    """The process groups Megatron's schedules use when given none (from ``parallel_state``)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    pg_collection = ProcessGroupCollection()
    pg_collection.tp = parallel_state.get_tensor_model_parallel_group()
    pg_collection.pp = parallel_state.get_pipeline_model_parallel_group()
    pg_collection.embd = parallel_state.get_embedding_group(check_initialized=False)
    pg_collection.pos_embd = parallel_state.get_position_embedding_group(check_initialized=False)
    pg_collection.cp = parallel_state.get_context_parallel_group()
    pg_collection.dp_cp = parallel_state.get_data_parallel_group(
        with_context_parallel=True, partial_data_parallel=False
    )
    return pg_collection
