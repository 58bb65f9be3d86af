"""The uniform cost model: time per op kind, optional per-stage scaling, one P2P latency.

Every cost model the simulator takes answers two questions (:class:`Costs`): how long an action lasts
on its stages, and how long a transfer takes between two ranks. :class:`CostModel` answers them with one
number per op kind; :class:`~dualpipe_plugin.schedules.stage_costs.StageCostModel` with measured costs
per stage and a latency + bytes/bandwidth link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from dualpipe_plugin.schedules.errors import CostModelError
from dualpipe_plugin.schedules.ir import Action, Op, OpKind, Pair

__all__ = ["CostModel", "Costs"]


class Costs(Protocol):
    """What the simulator asks a cost model."""

    def action_cost(self, action: Action, stages: tuple[int, ...]) -> float:
        """Duration of ``action`` whose ops sit on ``stages`` (one stage per op)."""
        ...

    def transfer_cost(self, event: tuple) -> float:
        """Time from the end of the op producing ``event`` (``(what, flow, stage, microbatch)``, see
        :mod:`~dualpipe_plugin.schedules.lowering`) until a consumer on another rank can use it."""
        ...

_KEYS = ("F", "B", "I", "W", "FB", "comm")
_OPTIONAL = ("I", "FB")  # derived from the others when not given
_EXAMPLE = {"F": 1, "B": 2, "W": 1, "comm": 0}


@dataclass(frozen=True, kw_only=True, slots=True)
class CostModel:
    """Durations of one chunk's ops, in any unit (the CLI and benchmarks use milliseconds)."""

    F: float = 1.0
    """Forward of one chunk for one micro-batch."""
    B: float = 2.0
    """Full backward (input and weight gradients)."""
    W: float = 1.0
    """Weight-gradient part of the backward, run alone by a W op."""
    I: float | None = None  # noqa: E741
    """Input-gradient part run by an I op; defaults to B - W."""
    FB: float | None = None
    """An overlapped F&B pair; defaults to F + B (no overlap gain)."""
    comm: float = 0.0
    """Latency added to every transfer between two ranks (local hand-overs are free)."""
    stage_scale: tuple[float, ...] | None = None
    """Optional multiplier of the compute costs per pipeline stage (e.g. a heavier head)."""

    def __post_init__(self) -> None:
        for key in _KEYS:
            value = getattr(self, key)
            if value is None:
                if key in _OPTIONAL:
                    continue
                raise CostModelError(
                    f"cost {key} is missing (None); give a number >= 0, for example {key}={_EXAMPLE[key]}"
                )
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
                raise CostModelError(f"cost {key}={value!r} is not a finite number")
            if value < 0:
                raise CostModelError(f"cost {key}={value} is negative; every cost must be >= 0")
        if self.W > self.B:
            raise CostModelError(
                f"cost W={self.W} exceeds B={self.B}: B is the full backward, which includes W; use W <= B"
            )
        if not math.isfinite(self.pair):
            raise CostModelError(
                f"costs F={self.F:g} and B={self.B:g} add up to {self.pair} (an F&B pair costs F + B unless FB is "
                f"given); express the costs in a larger unit so the numbers are smaller, e.g. ms instead of ns"
            )
        if self.stage_scale is not None and any(s < 0 for s in self.stage_scale):
            raise CostModelError(f"stage_scale {self.stage_scale} has a negative entry")

    @property
    def input_grad(self) -> float:
        return self.B - self.W if self.I is None else self.I

    @property
    def pair(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    @classmethod
    def parse(cls, text: str) -> "CostModel":
        """Parse ``F=1,B=2,W=1[,I=1][,FB=3][,comm=0.1]``; unknown keys and bad numbers raise."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise CostModelError(
                    f"cannot parse cost {item!r}: expected KEY=NUMBER with KEY one of {', '.join(_KEYS)} "
                    f"(for example 'F=1,B=2,W=1,FB=3')"
                )
            if key in values:
                raise CostModelError(f"cost {key} is given twice in {text!r}; give each key once")
            if not raw.strip():
                raise CostModelError(f"cost {key} is missing its value in {text!r}; write {key}=NUMBER, e.g. {key}=1")
            try:
                values[key] = float(raw)
            except ValueError:
                raise CostModelError(
                    f"cost {key}={raw.strip()!r} is not a number; write {key}=NUMBER, e.g. {key}=1"
                ) from None
        if not values:
            raise CostModelError(f"empty cost string {text!r}; give for example 'F=1,B=2,W=1'")
        return cls(**values)

    def _scale(self, stage: int) -> float:
        if self.stage_scale is None:
            return 1.0
        if stage >= len(self.stage_scale):
            raise CostModelError(
                f"stage_scale has {len(self.stage_scale)} entries but the schedule has a stage {stage}; "
                f"give one entry per pipeline stage"
            )
        return self.stage_scale[stage]

    def op_cost(self, op: Op, stage: int) -> float:
        base = {OpKind.F: self.F, OpKind.B: self.B, OpKind.I: self.input_grad, OpKind.W: self.W}[op.kind]
        return base * self._scale(stage)

    def action_cost(self, action: Action, stages: tuple[int, ...]) -> float:
        """Duration of an action; ``stages`` gives the stage of each of its ops."""
        if isinstance(action, Pair):
            return self.pair * (self._scale(stages[0]) + self._scale(stages[1])) / 2
        return self.op_cost(action, stages[0])

    def transfer_cost(self, event: tuple) -> float:
        """Every transfer between two ranks costs ``comm``, whatever it carries."""
        return self.comm
