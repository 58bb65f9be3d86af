"""Errors raised for bad schedule input. All are ``ValueError`` subclasses so callers can catch either."""

from __future__ import annotations

__all__ = ["ScheduleError", "ScheduleParseError", "ScheduleConfigError", "ScheduleInvalidError", "CostModelError"]


class ScheduleError(ValueError):
    """Base class of every schedule-layer error a user can cause."""


class ScheduleConfigError(ScheduleError):
    """A schedule was asked for with parameters it cannot run (odd P for dualpipe, too few micro-batches)."""


class ScheduleParseError(ScheduleError):
    """The text form of a schedule or an op could not be parsed."""


class ScheduleInvalidError(ScheduleError):
    """A schedule is incomplete, inconsistent or would deadlock. The message shows the rank x step grid."""


class CostModelError(ScheduleError):
    """A cost model is malformed, negative or missing a needed cost."""
