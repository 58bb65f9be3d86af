"""The standalone API: run a pipeline step over tensors, without DeepSpeed or Megatron.

>>> chunks = stage_modules(layers, "dualpipev", num_ranks=P, rank=r)      # this rank's two stages
>>> pipe = DualPipeline(chunks, schedule="dualpipev", loss_fn=nn.functional.cross_entropy)
>>> result = pipe.step(x, y, num_microbatches=8)   # x, y: the full batch on every rank that needs it
>>> result.loss                                    # mean micro-batch loss, the same on every rank

Batches are split into ``num_microbatches`` equal micro-batches along dim 0; micro-batch g is
``x[g*b:(g+1)*b]``. With dualpipe the first half of the micro-batches enters at rank 0 and the second
half at rank P-1. Inputs are needed on ranks that hold a first stage, labels on ranks that hold a last
stage (:meth:`DualPipeline.needs_inputs`, :meth:`DualPipeline.needs_labels`); other ranks may pass None.

Gradients equal those of ``sum_g loss_fn(model(x_g), y_g) / C`` on one process (``loss_reduction="mean"``,
the default) or of the plain sum (``"sum"``, DeepSeek's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.runtime.errors import NonFiniteLossError, PipelineConfigError
from dualpipe_plugin.runtime.executor import PipelineExecutor, StepOutcome
from dualpipe_plugin.runtime.transport import TorchTransport, Transport
from dualpipe_plugin.schedules import Action, build_schedule

__all__ = ["DualPipeline", "StepResult", "stage_modules", "split_stages"]

Batch = torch.Tensor | tuple[torch.Tensor, ...]


def split_stages(layers: Sequence[nn.Module], num_stages: int) -> list[list[nn.Module]]:
    """Cut ``layers`` into ``num_stages`` contiguous parts, sizes differing by at most one."""
    if len(layers) < num_stages:
        raise PipelineConfigError(
            f"cannot cut {len(layers)} layers into {num_stages} pipeline stages; give at least one layer per stage"
        )
    base, extra = divmod(len(layers), num_stages)
    parts, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        parts.append(list(layers[start : start + size]))
        start += size
    return parts


def stage_modules(layers: Sequence[nn.Module], schedule: str, num_ranks: int, rank: int) -> list[nn.Module]:
    """This rank's chunks (in chunk order) of a model given as a layer list, for ``schedule``."""
    placement = build_schedule(schedule, num_ranks, 2 * num_ranks).placement
    parts = split_stages(layers, placement.num_stages)
    return [nn.Sequential(*parts[placement.stage(rank, chunk)]) for chunk in range(placement.num_chunks)]


@dataclass
class StepResult:
    loss: torch.Tensor | None
    """Mean (or sum) of all micro-batch losses of the step; on every rank when ``reduce_loss``."""
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    """Global micro-batch -> loss, for micro-batches whose last stage is on this rank."""
    outputs: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    peak_activations: int = 0
    timeline: list[tuple[Action, float, float]] = field(default_factory=list)


def _split(batch: Batch, num_microbatches: int, what: str) -> list[tuple[torch.Tensor, ...]]:
    tensors = batch if isinstance(batch, tuple) else (batch,)
    for tensor in tensors:
        if tensor.shape[0] % num_microbatches:
            raise PipelineConfigError(
                f"{what} batch of {tensor.shape[0]} does not divide into {num_microbatches} equal micro-batches; "
                f"use a batch size that is a multiple of num_microbatches"
            )
    return list(zip(*(tensor.chunk(num_microbatches) for tensor in tensors)))


class _TensorHooks:
    def __init__(self, pipe: "DualPipeline", inputs, labels, loss_fn):
        self._pipe, self._inputs, self._labels, self._loss_fn = pipe, inputs, labels, loss_fn

    def inputs(self, microbatch: int):
        return self._inputs[microbatch]

    def forward(self, chunk: int, microbatch: int, inputs):
        return self._pipe.chunks[chunk](*inputs)

    def loss(self, microbatch: int, outputs):
        if self._loss_fn is None:
            return None
        return self._loss_fn(*outputs, *self._labels[microbatch])


class DualPipeline:
    """A pipeline rank running ``schedule`` on ``chunks`` over ``transport`` (default: the WORLD group).

    Options: ``overlap`` (None: F&B pairs go through the overlap engine whenever the chunks implement the
    protocol of :mod:`~dualpipe_plugin.runtime.staged`; True: the same, with a warning if they do not;
    False: always sequential),
    ``split_weights`` (the B/W split), ``timeout_s`` (every communication wait), ``shapes_per_microbatch``,
    ``detect_nonfinite`` (after every step, raise :class:`NonFiniteLossError` on every rank if any
    micro-batch loss is NaN or infinite; costs one tiny all-reduce, which ``reduce_loss`` already does).
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        schedule: str = "dualpipev",
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        transport: Transport | None = None,
        overlap: bool | None = None,
        split_weights: bool = True,
        timeout_s: float = 300.0,
        shapes_per_microbatch: bool = False,
        detect_nonfinite: bool = False,
    ):
        self.detect_nonfinite = detect_nonfinite
        if transport is None:
            if not dist.is_initialized():
                raise PipelineConfigError(
                    "torch.distributed is not initialised; call torch.distributed.init_process_group first "
                    "(gloo on CPU, nccl on GPU) or pass a transport"
                )
            transport = TorchTransport(list(range(dist.get_world_size())))
        self.chunks = list(chunks)
        self.loss_fn = loss_fn
        engine = None
        if overlap is not False:
            from dualpipe_plugin.runtime.overlap import overlap_engine_for

            # None (the default): overlap whenever the chunks support it, silently; True: warn if they don't.
            engine = overlap_engine_for(self.chunks, warn=overlap is True)
        self.executor = PipelineExecutor(
            schedule, self.chunks, transport, timeout_s=timeout_s, split_weights=split_weights,
            shapes_per_microbatch=shapes_per_microbatch, overlap=engine,
        )
        self.placement = self.executor.placement

    @property
    def rank(self) -> int:
        return self.executor.rank

    def needs_inputs(self) -> bool:
        return any(self.placement.is_first(self.rank, c) for c in range(self.placement.num_chunks))

    def needs_labels(self) -> bool:
        return any(self.placement.is_last(self.rank, c) for c in range(self.placement.num_chunks))

    def step(
        self,
        inputs: Batch | None = None,
        labels: Batch | None = None,
        *,
        num_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        loss_reduction: str = "mean",
        forward_only: bool = False,
        return_outputs: bool = False,
        reduce_loss: bool = True,
        record: bool = False,
    ) -> StepResult:
        """One training (or, with ``forward_only``, evaluation) step; gradients land in ``.grad``."""
        if loss_reduction not in ("mean", "sum"):
            raise PipelineConfigError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        loss_fn = loss_fn or self.loss_fn
        if loss_fn is None and not forward_only:
            raise PipelineConfigError("training needs a loss_fn (pass it to DualPipeline or to step)")
        if inputs is None and self.needs_inputs():
            raise PipelineConfigError(f"rank {self.rank} holds a first stage and needs the inputs; got None")
        if labels is None and self.needs_labels() and loss_fn is not None:
            raise PipelineConfigError(
                f"rank {self.rank} holds a last stage and needs the labels to compute the loss; got None"
            )
        # The schedule judges the micro-batch count first (a clear ScheduleConfigError for 0 or -1,
        # rather than a modulo by zero while splitting the batch).
        self.executor._schedule_for(num_microbatches)
        split_inputs = _split(inputs, num_microbatches, "input") if inputs is not None else None
        split_labels = _split(labels, num_microbatches, "label") if labels is not None else None
        hooks = _TensorHooks(self, split_inputs, split_labels, loss_fn if labels is not None else None)
        divisor = float(num_microbatches) if loss_reduction == "mean" else 1.0
        outcome: StepOutcome = self.executor.run(
            num_microbatches, hooks, forward_only=forward_only, return_outputs=return_outputs,
            record=record, loss_divisor=divisor,
        )
        return StepResult(
            loss=self._total_loss(outcome, divisor, reduce_loss or self.detect_nonfinite),
            losses=outcome.losses,
            outputs=outcome.outputs,
            peak_activations=outcome.peak_activations,
            timeline=outcome.timeline,
        )

    def _total_loss(self, outcome: StepOutcome, divisor: float, reduce_loss: bool) -> torch.Tensor | None:
        bad_here = sorted(g for g, value in outcome.losses.items() if not torch.isfinite(value).all())
        # [sum of losses, count of non-finite ones]: one all-reduce decides the same on every rank.
        local = torch.zeros(2, dtype=torch.float64)
        for value in outcome.losses.values():
            local[0] += value.double().cpu()
        local[1] = len(bad_here)
        if reduce_loss:
            total = local.to(self.executor.transport.device)
            self.executor.transport.all_reduce_sum(total)
            local = total.cpu()
        elif not outcome.losses:
            return None
        if self.detect_nonfinite and local[1] > 0:
            raise NonFiniteLossError(
                f"pipeline rank {self.rank}: {int(local[1])} micro-batch loss(es) of this step are NaN or infinite"
                + (f" (on this rank: micro-batches {bad_here})" if bad_here else "")
                + "; the step's gradients are not usable: zero them and skip the optimizer step, then lower the "
                "learning rate or check the data"
            )
        return (local[0] / divisor).float()

    def close(self) -> None:
        self.executor.close()
