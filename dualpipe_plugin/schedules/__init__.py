"""Pure-Python schedule layer (imports no torch): the IR, generators, validator, simulator and renderers.

>>> from dualpipe_plugin.schedules import build_schedule, simulate
>>> schedule = build_schedule("dualpipev", 4, 8)
>>> simulate(schedule).peak_activations_per_rank
(9, 9, 9, 9)
"""

from dualpipe_plugin.schedules.costs import CostModel
from dualpipe_plugin.schedules.errors import (
    CostModelError,
    ScheduleConfigError,
    ScheduleError,
    ScheduleInvalidError,
    ScheduleParseError,
)
from dualpipe_plugin.schedules.ir import Action, Op, OpKind, Pair, Placement, Schedule, parse_action, parse_ranks
from dualpipe_plugin.schedules.lowering import Payload, Transfer, lower, op_io
from dualpipe_plugin.schedules.registry import SCHEDULES, build_schedule, get_schedule, schedule_names
from dualpipe_plugin.schedules.spec import Constraints, ScheduleSpec
from dualpipe_plugin.schedules.simulate import SimResult, Span, simulate
from dualpipe_plugin.schedules.validate import validate

__all__ = [
    "Action",
    "Constraints",
    "CostModel",
    "CostModelError",
    "Op",
    "OpKind",
    "Pair",
    "Payload",
    "Placement",
    "SCHEDULES",
    "Schedule",
    "ScheduleConfigError",
    "ScheduleError",
    "ScheduleInvalidError",
    "ScheduleParseError",
    "ScheduleSpec",
    "SimResult",
    "Span",
    "Transfer",
    "build_schedule",
    "get_schedule",
    "lower",
    "op_io",
    "parse_action",
    "parse_ranks",
    "schedule_names",
    "simulate",
    "validate",
]
