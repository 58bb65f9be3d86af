"""The advisor: rank every registered schedule for a user's size, costs and activation-memory cap.

Costs are given per 1/P of the model (one 1F1B stage); a schedule that cuts the model into more stages
(dualpipev: 2P) gets proportionally cheaper chunks. Activation memory is counted in the same unit: one
micro-batch's activations of 1/P of the model, so 1F1B peaks at P and DualPipeV at (2P+1)/2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dualpipe_plugin.schedules.costs import CostModel
from dualpipe_plugin.schedules.errors import CostModelError, ScheduleConfigError
from dualpipe_plugin.schedules.registry import build_schedule, schedule_names
from dualpipe_plugin.schedules.simulate import simulate

__all__ = ["Candidate", "Advice", "advise", "scale_costs"]


@dataclass(frozen=True, slots=True)
class Candidate:
    schedule: str
    feasible: bool
    reason: str
    """Why it is not feasible (empty when it is)."""
    step_time: float | None = None
    bubble_fraction: float | None = None
    peak_activation_units: float | None = None
    parameter_copies: int = 1


@dataclass(frozen=True, slots=True)
class Advice:
    ranks: int
    microbatches: int
    memory_cap: float | None
    ranking: tuple[Candidate, ...]
    """Feasible schedules fastest first, then the infeasible ones."""

    @property
    def best(self) -> Candidate | None:
        return self.ranking[0] if self.ranking and self.ranking[0].feasible else None

    def explain(self) -> str:
        """Three lines: the choice, why, and the runner-up."""
        best = self.best
        if best is None:
            reasons = "; ".join(f"{c.schedule}: {c.reason}" for c in self.ranking)
            return f"no schedule fits P={self.ranks}, C={self.microbatches}" + (
                f" under a cap of {self.memory_cap:g} activation units" if self.memory_cap is not None else "") + f"\n{reasons}\n"
        runner = next((c for c in self.ranking[1:] if c.feasible), None)
        cap = f"within the cap of {self.memory_cap:g}" if self.memory_cap is not None else "with no memory cap"
        lines = [
            f"use {best.schedule}: simulated step {best.step_time:g}, {100 * best.bubble_fraction:.1f}% bubble, "
            f"peak {best.peak_activation_units:g} activation units {cap}",
            f"it holds {best.parameter_copies}x parameters; " + (
                "DualPipe mirrors every stage on two ranks and syncs their gradients"
                if best.parameter_copies == 2 else "no stage is duplicated"),
        ]
        if runner is not None:
            lines.append(f"runner-up {runner.schedule}: {runner.step_time / best.step_time:.3f}x the step time, "
                         f"peak {runner.peak_activation_units:g} units")
        else:
            lines.append("no other schedule is feasible here")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "ranks": self.ranks, "microbatches": self.microbatches, "memory_cap": self.memory_cap,
            "best": None if self.best is None else self.best.schedule,
            "ranking": [asdict(c) for c in self.ranking],
        }


def scale_costs(costs: CostModel, factor: float) -> CostModel:
    """Costs of a chunk ``factor`` times the size of the one ``costs`` describes (latency unscaled)."""
    return CostModel(
        F=costs.F * factor, B=costs.B * factor, W=costs.W * factor,
        I=None if costs.I is None else costs.I * factor,
        FB=None if costs.FB is None else costs.FB * factor,
        comm=costs.comm,
    )


def advise(ranks: int, microbatches: int, costs: CostModel, memory_cap: float | None = None) -> Advice:
    """Simulate every registered schedule at (ranks, microbatches) and rank them."""
    for what, value in (("pipeline rank", ranks), ("micro-batch", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleConfigError(f"advise needs at least 1 {what}, got {value!r}; give a whole number >= 1")
    if memory_cap is not None and not (math.isfinite(memory_cap) and memory_cap > 0):
        raise ScheduleConfigError(
            f"memory cap must be positive and finite, got {memory_cap}; give it in activation units (1F1B peaks at "
            f"P = {ranks}), or leave it out for no cap"
        )
    if costs.F == 0 and costs.B == 0:
        raise CostModelError("costs F=0 and B=0 make every schedule take no time, so there is nothing to rank; "
                             "give F and B > 0")
    candidates = []
    for name in schedule_names():
        try:
            schedule = build_schedule(name, ranks, microbatches)
        except ScheduleConfigError as error:
            candidates.append(Candidate(name, False, str(error).split(";")[0]))
            continue
        stages = schedule.placement.num_stages
        result = simulate(schedule, scale_costs(costs, ranks / stages))
        if not math.isfinite(result.makespan):
            raise CostModelError(
                f"the costs are so large that {name}'s simulated step time overflows to {result.makespan}; express "
                f"them in a larger unit so the numbers are smaller, e.g. ms instead of ns"
            )
        units = max(result.peak_activations_per_rank) * ranks / stages
        copies = 2 if schedule.placement.mirrored else 1
        if memory_cap is not None and units > memory_cap:
            candidates.append(Candidate(name, False, f"peak {units:g} activation units exceeds the cap {memory_cap:g}",
                                        result.makespan, result.bubble_fraction, units, copies))
            continue
        candidates.append(Candidate(name, True, "", result.makespan, result.bubble_fraction, units, copies))
    # Fastest first; on a tie, less activation memory, then fewer parameter copies.
    ranking = sorted(candidates, key=lambda c: (
        not c.feasible, c.step_time if c.step_time is not None else 0.0,
        c.peak_activation_units or 0.0, c.parameter_copies))
    return Advice(ranks, microbatches, memory_cap, tuple(ranking))
