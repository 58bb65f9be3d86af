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
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.runtime.errors import NonFiniteLossError, PipelineConfigError
from dualpipe_plugin.runtime.executor import PipelineExecutor, StepOutcome
from dualpipe_plugin.runtime.options import LOSS_REDUCTIONS, PipelineOptions
from dualpipe_plugin.runtime.transport import TorchTransport, Transport
from dualpipe_plugin.schedules import Action, ScheduleSpec, get_schedule

__all__ = ["DualPipeline", "StepResult", "stage_modules", "split_stages"]

Batch = torch.Tensor | tuple[torch.Tensor, ...]


def split_stages(
    layers: Sequence[nn.Module], num_stages: int, boundaries: Sequence[int] | None = None
) -> list[list[nn.Module]]:
    """Cut ``layers`` into ``num_stages`` contiguous parts, sizes differing by at most one, or at the given
    ``boundaries`` (``0 = b0 < b1 < ... = len(layers)``, as ``dualpipe-plugin advise --profile`` prints them)."""
    if len(layers) < num_stages:
        raise PipelineConfigError(
            f"cannot cut {len(layers)} layers into {num_stages} pipeline stages; give at least one layer per stage"
        )
    if boundaries is not None:
        bounds = list(boundaries)
        if (len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != len(layers)
                or any(b >= c for b, c in zip(bounds, bounds[1:]))):
            raise PipelineConfigError(
                f"boundaries {tuple(bounds)} do not cut {len(layers)} layers into {num_stages} non-empty stages; give "
                f"{num_stages + 1} increasing numbers from 0 to {len(layers)}"
            )
        return [list(layers[a:b]) for a, b in zip(bounds, bounds[1:])]
    base, extra = divmod(len(layers), num_stages)
    parts, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        parts.append(list(layers[start : start + size]))
        start += size
    return parts


def stage_modules(
    layers: Sequence[nn.Module], schedule: str | ScheduleSpec, num_ranks: int, rank: int,
    boundaries: Sequence[int] | None = None,
) -> list[nn.Module]:
    """This rank's chunks (in chunk order) of a model given as a layer list, for ``schedule`` (cut uniformly,
    or at ``boundaries``: see :func:`split_stages`)."""
    placement = get_schedule(schedule).placement(num_ranks)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_ranks:
        raise PipelineConfigError(
            f"rank={rank!r} is not a pipeline rank of {num_ranks}; pass this process's position in the "
            f"pipeline, 0..{num_ranks - 1}"
        )
    parts = split_stages(layers, placement.num_stages, boundaries)
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
        if not isinstance(tensor, torch.Tensor):
            raise PipelineConfigError(
                f"the {what}s must be a tensor or a tuple of tensors, got {type(tensor).__name__}; stack them into "
                f"one tensor per {what} (batch along dim 0)"
            )
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            rows = "a 0-dimensional tensor (no batch dimension)" if tensor.dim() == 0 else "0 rows"
            raise PipelineConfigError(
                f"{what} batch has {rows}: each of the {num_microbatches} micro-batches would be empty (and its loss "
                f"NaN); pass a batch with a multiple of {num_microbatches} rows along dim 0"
            )
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
    """A pipeline rank running a schedule on ``chunks`` over ``transport`` (default: the WORLD group).

    ``schedule`` is a registered name (``"dualpipev"`` when neither it nor ``options`` is given) or a
    :class:`~dualpipe_plugin.schedules.ScheduleSpec`. The other options are the fields of
    :class:`~dualpipe_plugin.runtime.options.PipelineOptions`, given as keywords (``overlap``,
    ``split_weights``, ``timeout_s``, ``shapes_per_microbatch``, ``loss_reduction``, ``detect_nonfinite``)
    or as one ``options`` object, not both.
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        schedule: str | ScheduleSpec | None = None,
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        transport: Transport | None = None,
        options: PipelineOptions | None = None,
        **option_values: Any,
    ):
        if options is None:
            options = PipelineOptions.from_values({"schedule": schedule or "dualpipev", **option_values})
        elif schedule is not None or option_values:
            raise PipelineConfigError(
                "pass the schedule and options either as one PipelineOptions (options=) or as keywords, not both"
            )
        if transport is None:
            if not dist.is_initialized():
                raise PipelineConfigError(
                    "torch.distributed is not initialised; call torch.distributed.init_process_group first "
                    "(gloo on CPU, nccl on GPU) or pass a transport"
                )
            transport = TorchTransport(list(range(dist.get_world_size())))
        self.options = options
        self.chunks = list(chunks)
        self.loss_fn = loss_fn
        self.executor = PipelineExecutor(self.chunks, transport, options)
        self.placement = self.executor.placement

    @property
    def detect_nonfinite(self) -> bool:
        return self.options.detect_nonfinite

    @property
    def rank(self) -> int:
        return self.executor.rank

    def needs_inputs(self) -> bool:
        return self.placement.holds_first_stage(self.rank)

    def needs_labels(self) -> bool:
        return self.placement.holds_last_stage(self.rank)

    def step(
        self,
        inputs: Batch | None = None,
        labels: Batch | None = None,
        *,
        num_microbatches: int,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        loss_reduction: str | None = None,
        forward_only: bool = False,
        return_outputs: bool = False,
        reduce_loss: bool = True,
        record: bool = False,
    ) -> StepResult:
        """One training (or, with ``forward_only``, evaluation) step; gradients land in ``.grad``.

        ``loss_reduction`` overrides the pipeline's option for this step."""
        if loss_reduction is None:
            loss_reduction = self.options.loss_reduction
        if loss_reduction not in LOSS_REDUCTIONS:
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
        self.executor.schedule_for(num_microbatches)
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
        if reduce_loss:
            # One all-reduce of [sum, count of non-finite losses] decides the same on every rank.
            total, bad = self.executor.total_loss(outcome.losses)
        elif not outcome.losses:
            return None
        else:
            total = sum((value.double().cpu() for value in outcome.losses.values()), torch.zeros((), dtype=torch.float64))
            bad = len(bad_here)
        if self.detect_nonfinite and bad > 0:
            raise NonFiniteLossError(
                f"pipeline rank {self.rank}: {bad} micro-batch loss(es) of this step are NaN or infinite"
                + (f" (on this rank: micro-batches {bad_here})" if bad_here else "")
                + "; the step's gradients are not usable: zero them and skip the optimizer step, then lower the "
                "learning rate or check the data"
            )
        return (total / divisor).float()

    def close(self) -> None:
        self.executor.close()
