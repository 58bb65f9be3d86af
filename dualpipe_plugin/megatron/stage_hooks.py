"""The executor's :class:`~dualpipe_plugin.runtime.executor.StageHooks` for Megatron model chunks: one
micro-batch forward on chunk c as Megatron's ``forward_step`` does it, and its loss.

    set_input_tensor([received activation or None]); output, loss_func = forward_step_func(it_c, model[c])
    on the chunk that ends the route: loss_func(output) -> (loss, num_tokens, report) | (loss, report),
        loss / clamp(num_tokens, 1) / num_microbatches (unless calculate_per_token_loss) | loss * cp / M,
        config.grad_scale_func(loss) (the loss-scaling optimizers), report appended to forward_data_store
    MoEAuxLossAutoScaler / MTP loss scale set as Megatron sets them

With overlap (``PipelineOptions.overlap``) every forward runs the chunk's staged form instead
(:mod:`~dualpipe_plugin.megatron.moe_overlap`), reading the batch through ``forward_step_func``'s
schedule-plan convention (:meth:`MegatronStageHooks.staged_inputs`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dualpipe_plugin.megatron.errors import MegatronScheduleError
from dualpipe_plugin.megatron.feeds import FeedView

__all__ = ["MegatronStageHooks", "StepOptions"]


@dataclass
class StepOptions:
    forward_step_func: Callable
    num_microbatches: int
    forward_only: bool
    collect_non_loss_data: bool
    first_val_step: bool | None
    cp_size: int


class MegatronStageHooks:
    """The executor's :class:`~dualpipe_plugin.runtime.executor.StageHooks` for Megatron model chunks."""

    def __init__(self, pipeline: Any, options: StepOptions, views: list[FeedView | None]):
        """``pipeline``: the model's runtime objects (``chunks``, ``config``, ``staged``, ``transport``,
        ``is_last(chunk)``, ``placement_chunk(chunk)``: :class:`~dualpipe_plugin.megatron.schedule_fn`'s)."""
        self._pipeline = pipeline
        self._options = options
        self._views = views
        self._loss_funcs: dict[int, Any] = {}
        self._raw_outputs: dict[int, Any] = {}
        self._first_forward_done: set[int] = set()
        self.reports: dict[int, Any] = {}
        self.total_num_tokens = torch.zeros([], dtype=torch.int, device=pipeline.transport.device)

    def inputs(self, microbatch: int) -> tuple:
        return ()  # a first stage's model reads its data through forward_step_func

    def _begin_forward(self, chunk: int, microbatch: int):
        """What every forward of a chunk starts with, as Megatron's ``forward_step``: the first-micro-batch
        mark, the current micro-batch; returns the data view for ``forward_step_func``."""
        from megatron.core.pipeline_parallel.schedules import set_current_microbatch

        options, model = self._options, self._pipeline.chunks[chunk]
        if chunk not in self._first_forward_done:
            self._first_forward_done.add(chunk)
            first = options.first_val_step if (options.forward_only and options.first_val_step is not None) else True
            if first and hasattr(model, "set_is_first_microbatch"):
                model.set_is_first_microbatch()
        set_current_microbatch(model, microbatch)
        view = self._views[chunk]
        return view.at(microbatch) if view is not None else None

    def forward(self, chunk: int, microbatch: int, inputs: tuple) -> Any:
        from megatron.core.utils import get_attr_wrapped_model

        pipeline, options = self._pipeline, self._options
        if pipeline.staged is not None:  # overlap: every forward through the staged chunk
            return pipeline.staged[chunk](*self.staged_inputs(chunk, microbatch, inputs))
        model = pipeline.chunks[chunk]
        config = pipeline.config
        data = self._begin_forward(chunk, microbatch)
        get_attr_wrapped_model(model, "set_input_tensor")(list(inputs) if inputs else [None])
        autocast = (
            torch.autocast(pipeline.transport.device.type, dtype=config.autocast_dtype)
            if getattr(config, "enable_autocast", False) else nullcontext()
        )
        with autocast:
            output, loss_func = options.forward_step_func(data, model)
        if pipeline.is_last(chunk):
            self._loss_funcs[microbatch] = loss_func
            self._raw_outputs[microbatch] = output
        elif torch.is_tensor(output) and output.is_floating_point() and config.pipeline_dtype is not None:
            # Activations travel in pipeline_dtype, as in Megatron's P2P buffers. Float16Module upcasts the
            # output of "vp-last on the last pp rank" to fp32; in a V that chunk is a middle stage.
            output = output.to(config.pipeline_dtype)
        self._set_aux_loss_scales(output if torch.is_tensor(output) else None)
        return output

    def staged_inputs(self, chunk: int, microbatch: int, inputs: tuple) -> tuple:
        """The overlap path reads the batch through the user's ``forward_step_func`` with Megatron's
        schedule-plan convention (what its combined 1F1B does): ``forward_step_func(data, model,
        return_schedule_plan=True)`` calls ``model.build_schedule_plan(tokens, position_ids, attention_mask,
        labels=..., ...)``, which here records its arguments; the staged chunk then runs them."""
        pipeline, options = self._pipeline, self._options
        model = _schedule_plan_owner(pipeline.chunks[chunk])
        data = self._begin_forward(chunk, microbatch)
        captured: dict[str, Any] = {}

        def build_schedule_plan(input_ids=None, position_ids=None, attention_mask=None, decoder_input=None,
                                labels=None, *args, **kwargs):
            captured.update(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            labels=labels)
            return _CapturedPlan()

        model.__dict__["build_schedule_plan"] = build_schedule_plan
        try:
            plan, loss_func = options.forward_step_func(data, model, return_schedule_plan=True)
        except TypeError as error:
            if "return_schedule_plan" not in str(error):
                raise
            raise MegatronScheduleError(
                "pipeline overlap (--overlap-moe-expert-parallel-comm / overlap=True) reads each batch through "
                "Megatron's schedule-plan convention: forward_step_func(data_iterator, model, "
                "return_schedule_plan=False) must, when asked, return (model.build_schedule_plan(tokens, "
                "position_ids, attention_mask, labels=labels, loss_mask=loss_mask), loss_func), as Megatron-LM's "
                "pretrain_gpt.py does for its combined 1F1B"
            ) from None
        finally:
            model.__dict__.pop("build_schedule_plan", None)
        if not isinstance(plan, _CapturedPlan):
            raise MegatronScheduleError(
                "forward_step_func(..., return_schedule_plan=True) must return the model's build_schedule_plan(...) "
                f"as its first value, got {type(plan).__name__}"
            )
        if pipeline.is_last(chunk):
            self._loss_funcs[microbatch] = loss_func
        self._set_aux_loss_scales(inputs[0] if inputs and torch.is_tensor(inputs[0]) else None)
        if pipeline.placement_chunk(chunk).pre_process:
            return (captured["input_ids"], captured["position_ids"], captured["attention_mask"], captured["labels"])
        return (inputs[0], captured["attention_mask"], captured["labels"])

    def loss(self, microbatch: int, outputs: tuple) -> torch.Tensor | None:
        options, config = self._options, self._pipeline.config
        loss_func = self._loss_funcs.pop(microbatch)
        output = self._raw_outputs.pop(microbatch, outputs[0] if len(outputs) == 1 else outputs)
        if loss_func is None:
            self.reports[microbatch] = output
            return None
        if options.collect_non_loss_data:
            self.reports[microbatch] = loss_func(output, non_loss_data=True)
            return None
        result = loss_func(output)
        if len(result) == 3:
            loss, num_tokens, report = result
            if not config.calculate_per_token_loss:
                loss = loss / torch.clamp(torch.as_tensor(num_tokens), min=1)
                loss = loss / options.num_microbatches
            self.total_num_tokens += torch.as_tensor(num_tokens).to(self.total_num_tokens.device)
        elif len(result) == 2:
            loss, report = result
            loss = loss * options.cp_size
            loss = loss / options.num_microbatches
        else:
            raise MegatronScheduleError(
                f"loss_func returned {len(result)} values; Megatron's convention is (loss, num_tokens, report) "
                f"or (loss, report)"
            )
        self.reports[microbatch] = report
        if options.forward_only:
            return None  # the reports are the result; a plain number is a loss Megatron accepts here
        if not torch.is_tensor(loss):
            raise MegatronScheduleError(
                f"loss_func returned a {type(loss).__name__} loss for micro-batch {microbatch}; training needs a "
                f"scalar tensor to back-propagate (return the loss tensor itself, not .item())"
            )
        if config.grad_scale_func is not None:
            loss = config.grad_scale_func(loss)
        return loss

    def _set_aux_loss_scales(self, like: torch.Tensor | None) -> None:
        """As Megatron's ``forward_step_calc_loss``: the MoE aux-loss and MTP loss backward scales."""
        config, options = self._pipeline.config, self._options
        device = like.device if like is not None else self._pipeline.transport.device
        has_moe = getattr(config, "num_moe_experts", None) is not None
        has_mtp = getattr(config, "mtp_num_layers", None) is not None
        if not (has_moe or has_mtp):
            return
        scale = torch.ones(1, device=device)
        if config.grad_scale_func is not None:
            scale = config.grad_scale_func(scale)
        if has_moe:
            from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

            MoEAuxLossAutoScaler.set_loss_scale(
                scale if config.calculate_per_token_loss else scale * options.cp_size / options.num_microbatches
            )
        if has_mtp:
            from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

            MTPLossAutoScaler.set_loss_scale(
                scale if config.calculate_per_token_loss else scale / options.num_microbatches
            )


class _CapturedPlan:
    """What ``build_schedule_plan`` returns while the overlap path reads a batch (its arguments are kept)."""


def _schedule_plan_owner(model: Any) -> Any:
    """The module inside DDP / Float16Module wrappers that has ``build_schedule_plan`` (GPTModel)."""
    while not hasattr(model, "build_schedule_plan") and hasattr(model, "module"):
        model = model.module
    return model
