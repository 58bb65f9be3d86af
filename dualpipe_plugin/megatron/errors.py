"""Errors of the Megatron-Core adapter. User mistakes are ``ValueError`` subclasses whose message names the fix."""

from __future__ import annotations

__all__ = ["MegatronScheduleError", "UnknownScheduleError"]


class MegatronScheduleError(ValueError):
    """A Megatron setting that the chosen pipeline schedule cannot run with (raised before training)."""


class UnknownScheduleError(MegatronScheduleError):
    """``--pipeline-schedule`` / ``config.pipeline_schedule`` names no registered schedule."""
