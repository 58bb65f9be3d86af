"""The options of one pipeline: one frozen object, built once at the door and passed down as it is.

The standalone :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline`, the DeepSpeed adapter (from the
JSON config's ``"pipeline"`` section) and the Megatron adapter (from its flags or
``configure_model_config``) all build a :class:`PipelineOptions`, and the executor reads it. The defaults
live here only, and so do the checks: each names the key as the user spelled it and the fix, in the
caller's own words (``pipeline.timeout_s`` for DeepSpeed, ``--pipeline-timeout-s`` for Megatron,
``timeout_s=`` in Python).

>>> options = PipelineOptions(schedule=get_schedule("dualpipev"), timeout_s=120)
>>> options.replace(overlap=False).overlap
False
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.schedules import ScheduleSpec, get_schedule

__all__ = ["DEFAULT_TIMEOUT_S", "LOSS_REDUCTIONS", "PipelineOptions", "python_spelling"]

DEFAULT_TIMEOUT_S = 300.0
"""How long any pipeline communication may wait by default (seconds)."""

LOSS_REDUCTIONS = ("mean", "sum")


def python_spelling(field: str) -> str:
    """How a keyword argument is named in error messages of the Python API."""
    return field


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineOptions:
    """Everything about a pipeline except its model, data and process groups."""

    schedule: ScheduleSpec
    """The schedule (see :func:`dualpipe_plugin.schedules.get_schedule`)."""
    overlap: bool | None = None
    """F&B pairs through the overlap engine: None = whenever the chunks implement the overlap protocol
    (silently); True = the same, warning once if they do not; False = always one after the other."""
    split_weights: bool = True
    """Split backwards into I (input gradients) and W (weight gradients) where the schedule does."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Seconds any communication (point-to-point or collective) may wait before the step fails, naming
    the peer and the op."""
    shapes_per_microbatch: bool = False
    """Activation shapes may differ between the micro-batches of one step (one header per transfer);
    by default they may differ only between steps."""
    loss_reduction: str = "mean"
    """'mean': gradients of the mean micro-batch loss; 'sum': of their sum (DeepSeek's convention)."""
    detect_nonfinite: bool = False
    """After every step, raise NonFiniteLossError on every rank if any micro-batch loss is NaN or inf."""

    def __post_init__(self) -> None:
        _check(self, python_spelling, PipelineConfigError)

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, Any],
        *,
        spell: Callable[[str], str] = python_spelling,
        error: type[ValueError] = PipelineConfigError,
    ) -> "PipelineOptions":
        """Options from a mapping of field name -> value (a config section, parsed flags); missing fields
        take their defaults. ``schedule`` may be a name. Every bad value raises ``error`` naming the key as
        ``spell(field)`` spells it, before anything is built."""
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"PipelineOptions has no field(s) {', '.join(unknown)}")
        schedule = values.get("schedule")
        if isinstance(schedule, str):
            try:
                values["schedule"] = get_schedule(schedule)
            except ValueError as bad:
                raise error(f"{spell('schedule')}: {bad}") from None
        probe = _Unchecked(values)
        _check(probe, spell, error)
        return cls(**values)

    def replace(self, **changes: Any) -> "PipelineOptions":
        """A copy with ``changes`` (checked like the original)."""
        return dataclasses.replace(self, **changes)


class _Unchecked:
    """Field values looked up like attributes, defaults included, for checking before construction."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = values

    def __getattr__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        field = next(f for f in dataclasses.fields(PipelineOptions) if f.name == name)
        if field.default is dataclasses.MISSING:
            raise AttributeError(name)
        return field.default


def _check(options: Any, spell: Callable[[str], str], error: type[ValueError]) -> None:
    try:
        schedule = options.schedule
    except AttributeError:
        raise error(f"{spell('schedule')} is required: name a pipeline schedule") from None
    if not isinstance(schedule, ScheduleSpec):
        raise error(
            f"{spell('schedule')} must be a ScheduleSpec (dualpipe_plugin.schedules.get_schedule(name)), got "
            f"{schedule!r}"
        )
    if options.overlap is not None and not isinstance(options.overlap, bool):
        raise error(
            f"{spell('overlap')} must be true or false, got {options.overlap!r} (or unset: overlap whenever the "
            f"chunks implement the overlap protocol)"
        )
    for name in ("split_weights", "shapes_per_microbatch", "detect_nonfinite"):
        value = getattr(options, name)
        if not isinstance(value, bool):
            raise error(f"{spell(name)} must be true or false, got {value!r}")
    timeout = options.timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise error(
            f"{spell('timeout_s')} must be a positive, finite number of seconds, got {timeout!r}; it bounds every "
            f"pipeline communication wait (default {DEFAULT_TIMEOUT_S:g})"
        )
    if options.loss_reduction not in LOSS_REDUCTIONS:
        raise error(f"{spell('loss_reduction')} must be 'mean' or 'sum', got {options.loss_reduction!r}")
