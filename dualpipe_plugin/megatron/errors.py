"""Errors of the Megatron-Core adapter. User mistakes are ``ValueError`` subclasses whose message names the fix."""

from __future__ import annotations

__all__ = ["MegatronScheduleError", "MicrobatchCountError", "UnknownScheduleError"]


class MegatronScheduleError(ValueError):
    """A Megatron setting that the chosen pipeline schedule cannot run with (raised before training)."""


class UnknownScheduleError(MegatronScheduleError):
    """``--pipeline-schedule`` / ``config.pipeline_schedule`` names no registered schedule."""


class MicrobatchCountError(MegatronScheduleError, RuntimeError):
    """A step asks for a micro-batch count the schedule cannot run. Also a ``RuntimeError``, which is what
    Megatron-Core's own schedules raise for the same misuse (code written for them keeps catching it)."""
