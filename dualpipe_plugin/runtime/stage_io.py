"""What a chunk may hand to the next stage and what a loss must be: one error naming the fix, not an
``AttributeError`` deep in the transfer code.

Between stages only tensors travel (a tensor, or a tuple or list of them; the next stage receives them as
positional arguments): a dict, a number or ``None`` there is refused. A last stage may return anything its
loss function takes (a dict included). A loss must be a tensor holding one value, so that autograd can
back-propagate it and the step can add it up.
"""

from __future__ import annotations

from typing import Any

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError

__all__ = ["check_stage_outputs", "check_loss"]


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def check_stage_outputs(outputs: tuple, *, rank: int, chunk: int, microbatch: int) -> None:
    """Refuse anything but tensors in ``outputs``, which chunk ``chunk`` of pipeline rank ``rank`` returned
    for ``microbatch`` and which must travel to the next stage."""
    where = f"pipeline rank {rank}: chunk {chunk} returned"
    rule = ("between pipeline stages a chunk must return a tensor or a tuple of tensors (the next stage receives "
            "them as positional arguments)")
    if len(outputs) == 1 and isinstance(outputs[0], dict):
        raise PipelineConfigError(
            f"{where} a dict (keys {sorted(map(str, outputs[0]))}) for micro-batch {microbatch}; {rule}: return "
            f"tuple(output.values()) in a fixed order and take them positionally in the next stage (a last "
            f"stage may return a dict: it goes to the loss function as it is)"
        )
    for index, value in enumerate(outputs):
        if not isinstance(value, torch.Tensor):
            hint = " (did its forward forget to return?)" if value is None and len(outputs) == 1 else ""
            raise PipelineConfigError(
                f"{where} {_kind(value)} as output {index} for micro-batch {microbatch}{hint}; {rule}: make it a "
                f"tensor (torch.as_tensor) or leave it out"
            )


def check_loss(loss: Any, *, rank: int, microbatch: int) -> torch.Tensor:
    """``loss`` (the loss function's value for ``microbatch`` on pipeline rank ``rank``), if it is a tensor
    holding one value; otherwise an error saying how to make it one."""
    if not isinstance(loss, torch.Tensor):
        shown = repr(loss)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise PipelineConfigError(
            f"pipeline rank {rank}: the loss of micro-batch {microbatch} is {_kind(loss)} ({shown}), not a tensor; "
            f"the loss function must return a torch.Tensor holding one value that autograd can back-propagate: "
            f"return the loss tensor itself, not loss.item() or float(loss)"
        )
    if loss.numel() != 1:
        raise PipelineConfigError(
            f"pipeline rank {rank}: the loss of micro-batch {microbatch} is a tensor of shape {list(loss.shape)} "
            f"({loss.numel()} values); the loss function must reduce it to one value: add .mean() (or .sum()), "
            f"or use the torch loss's default reduction='mean'"
        )
    return loss
