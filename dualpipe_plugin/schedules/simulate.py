"""The simulator: per-op start/end times on every rank, bubble and peak activations, for a cost model.

Each rank runs its actions in order; an action starts when the rank is free and every op in it has its
inputs (the producer's end, plus the cost model's transfer time when the producer is another rank: one
``comm`` latency for :class:`CostModel`, latency + bytes / bandwidth of that stage boundary for a
:class:`~dualpipe_plugin.schedules.stage_costs.StageCostModel`). This is a longest
path over the dependency DAG, walked once with a worklist, so P=64, C=512 takes well under a second.

Live activations: a (chunk, micro-batch) is live from its ``F`` until its backward is complete (``B``, or
``W`` when split, since W still reads the saved inputs). In an F&B pair the forward's activation is
counted before the backward's is released, as an interleaved pair really holds both.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dualpipe_plugin.schedules.costs import CostModel, Costs
from dualpipe_plugin.schedules.errors import ScheduleInvalidError
from dualpipe_plugin.schedules.grid import format_grid
from dualpipe_plugin.schedules.ir import Action, OpKind, Pair, Schedule
from dualpipe_plugin.schedules.lowering import op_events
from dualpipe_plugin.schedules.structure import check_structure

__all__ = ["Span", "SimResult", "simulate", "walk"]


@dataclass(frozen=True, slots=True)
class Span:
    """One action's place in time on one rank."""

    rank: int
    step: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True, slots=True, eq=False)
class SimResult:
    makespan: float
    busy_per_rank: tuple[float, ...]
    idle_per_rank: tuple[float, ...]
    peak_activations_per_rank: tuple[int, ...]
    schedule: Schedule
    times: list[list[tuple[float, float]]]

    @property
    def spans(self) -> tuple[tuple[Span, ...], ...]:
        """Every action with its start and end, per rank."""
        return tuple(
            tuple(Span(rank, step, self.schedule.actions[rank][step], *t) for step, t in enumerate(row))
            for rank, row in enumerate(self.times)
        )

    def timed_rows(self) -> list[list[tuple]]:
        """Per rank, (action, start, end) triples: the input of the renderers."""
        return [
            [(self.schedule.actions[rank][step], start, end) for step, (start, end) in enumerate(row)]
            for rank, row in enumerate(self.times)
        ]

    @property
    def bubble(self) -> float:
        """Idle time of the busiest rank: what the schedule adds over that rank's own work."""
        return self.makespan - max(self.busy_per_rank)

    @property
    def bubble_fraction(self) -> float:
        """Share of all rank-time spent idle."""
        total = self.makespan * len(self.busy_per_rank)
        return sum(self.idle_per_rank) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "makespan": self.makespan,
            "bubble": self.bubble,
            "bubble_fraction": self.bubble_fraction,
            "idle_per_rank": list(self.idle_per_rank),
            "busy_per_rank": list(self.busy_per_rank),
            "peak_activations_per_rank": list(self.peak_activations_per_rank),
        }


def _describe_wait(schedule: Schedule, rank: int, step: int, need: tuple, producers: dict) -> str:
    what, flow, stage, microbatch = need
    action = schedule.actions[rank][step]
    noun = {"F": "the forward output", "G": "the input gradient", "W": "the weight pass"}[what]
    where = producers.get((flow, stage))
    at = f"rank {where[0]} chunk {where[1]}" if where else f"stage {stage}"
    if where is not None and where[0] == rank:
        at += ", later on this same rank (ops out of order)"
    return f"rank {rank} step {step} ({action}) waits for {noun} of micro-batch {microbatch} at {at}"


def _plan(schedule: Schedule, costs: Costs, rank: int) -> list[tuple[tuple, tuple, tuple, float, tuple | None]]:
    """Per action: the events it needs, their transfer times (paid when the producer is another rank),
    the events it produces, its duration, and for a pair timed half by half (a cost model's optional
    ``forward_half``) how many of the needs are its forward's and the forward half's duration."""
    placement = schedule.placement
    forward_half = getattr(costs, "forward_half", None)
    plan = []
    for action in schedule.actions[rank]:
        needs: tuple = ()
        produces: tuple = ()
        stages = []
        counts = []
        for op in action.ops():
            flow, stage, _, next_hop = placement.slot(rank, op.chunk)
            op_needs, op_produces = op_events(flow, stage, next_hop is not None, op)
            needs += op_needs
            produces += (op_produces,)
            stages.append(stage)
            counts.append(len(op_needs))
        transfers = tuple(costs.transfer_cost(need) for need in needs)
        halves = None
        if forward_half is not None and isinstance(action, Pair):
            first = forward_half(action, tuple(stages))
            halves = None if first is None else (counts[0], first)
        plan.append((needs, transfers, produces, costs.action_cost(action, tuple(stages)), halves))
    return plan


def walk(schedule: Schedule, costs: Costs) -> list[list[tuple[float, float]]]:
    """(start, end) of every action of every rank; raise :class:`ScheduleInvalidError` (with the grid)
    if some rank can never run."""
    num_ranks = schedule.num_ranks
    plans = [_plan(schedule, costs, rank) for rank in range(num_ranks)]
    finished: dict = {}
    waiting: dict = {}
    position = [0] * num_ranks
    clock = [0.0] * num_ranks
    times: list[list[tuple[float, float]]] = [[] for _ in range(num_ranks)]
    ready = deque(range(num_ranks))
    while ready:
        rank = ready.popleft()
        plan, row, step, start = plans[rank], times[rank], position[rank], clock[rank]
        while step < len(plan):
            needs, transfers, produces, duration, halves = plan[step]
            missing = None
            arrivals = []
            for need, transfer in zip(needs, transfers):
                done = finished.get(need)
                if done is None:
                    missing = need
                    break
                arrivals.append(done[0] + transfer if done[1] != rank else done[0])
            if missing is not None:
                waiting.setdefault(missing, []).append(rank)
                break
            if halves is None:
                ready_at = max([start, *arrivals])
                end = ready_at + duration
                out = (end,) * len(produces)
            else:  # a pair half by half: the forward on its inputs, then the backward on its gradients
                split, first = halves
                ready_at = max([start, *arrivals[:split]])
                end = max([ready_at + first, *arrivals[split:]]) + duration - first
                out = (ready_at + first, end)
                ready_at = end - duration  # the span leaves out a wait between the halves, as the runtime's record
            row.append((ready_at, end))
            for event, at in zip(produces, out):
                finished[event] = (at, rank)
                if event in waiting:
                    ready.extend(waiting.pop(event))
            start = end
            step += 1
        position[rank], clock[rank] = step, start

    stuck = {rank: position[rank] for rank in range(num_ranks) if position[rank] < len(plans[rank])}
    if stuck:
        raise _deadlock_error(schedule, plans, stuck, finished)
    return times


def _deadlock_error(schedule: Schedule, plans: list, stuck: dict[int, int], finished: dict) -> ScheduleInvalidError:
    placement = schedule.placement
    producers = {}
    for route in placement.routes:
        for stage, slot in enumerate(route):
            producers[(placement.flow_of(slot[1]), stage)] = slot
    reasons = []
    for rank, step in stuck.items():
        for need in plans[rank][step][0]:
            if need not in finished:
                reasons.append(_describe_wait(schedule, rank, step, need, producers))
    return ScheduleInvalidError(
        f"schedule {schedule.name!r} deadlocks: {len(stuck)} rank(s) wait forever.\n"
        + "\n".join(f"  - {reason}" for reason in reasons)
        + "\n"
        + format_grid(schedule, stuck)
    )


def _peak_activations(schedule: Schedule, rank: int) -> int:
    live = peak = 0
    for action in schedule.actions[rank]:
        for op in action.ops():
            if op.kind is OpKind.F:
                live += 1
                peak = max(peak, live)
            elif op.kind in (OpKind.B, OpKind.W):
                live -= 1
    return peak


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimResult:
    """Simulate ``schedule`` under ``costs`` (default F=1, B=2, W=1: the unit model of DeepSeek's table;
    any :class:`~dualpipe_plugin.schedules.costs.Costs`, e.g. a measured
    :class:`~dualpipe_plugin.schedules.stage_costs.StageCostModel`).

    Validates on the way (the same checks as :func:`~dualpipe_plugin.schedules.validate.validate`): an
    incomplete or deadlocking schedule raises :class:`ScheduleInvalidError` instead of returning figures.
    """
    costs = costs or CostModel()
    check_structure(schedule)
    times = walk(schedule, costs)
    makespan = max((row[-1][1] for row in times if row), default=0.0)
    busy = tuple(sum(end - start for start, end in row) for row in times)
    return SimResult(
        makespan=makespan,
        busy_per_rank=busy,
        idle_per_rank=tuple(makespan - b for b in busy),
        peak_activations_per_rank=tuple(_peak_activations(schedule, r) for r in range(schedule.num_ranks)),
        schedule=schedule,
        times=times,
    )
