"""Where to cut the model: stage costs from layer costs, and an exact search over contiguous cuts.

A model is a row of *units* (a profiled layer plus what is attached to it, see
:mod:`~dualpipe_plugin.schedules.cost_file`). A cut ``0 = b0 < b1 < ... < bS = n`` gives stage s the
units ``[b_s, b_s+1)``: its op costs are the sums of theirs, its activation bytes the sum less what two
neighbours save twice (the output of one is the input of the next), and a transfer across the cut after
stage s carries the output of its last unit.

:func:`search_cuts` finds the cut with the shortest simulated step whose every rank fits the memory cap,
by branch and bound over the stages in order. The bound is the simulated step itself with every stage
not yet cut given the least any single remaining unit costs (and the least hop): the step time never
decreases when a cost grows (:mod:`~dualpipe_plugin.schedules.timing_graph`), so no completion of the
partial cut can beat it. Memory is bounded the same way. A node budget stops the search on huge inputs;
the result then says it is the best found, not proven optimal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from dualpipe_plugin.schedules.errors import CostModelError
from dualpipe_plugin.schedules.ir import Schedule
from dualpipe_plugin.schedules.memory import MemoryLayout, OptimizerSharding, RankMemory, StageMemory, estimate_memory
from dualpipe_plugin.schedules.stage_costs import Link, StageCost, StageCostModel
from dualpipe_plugin.schedules.timing_graph import TimingGraph

__all__ = ["Unit", "StageSlicer", "CutResult", "search_cuts", "uniform_bounds"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Unit:
    """Costs of one cuttable unit for one micro-batch (ms, bytes)."""

    F: float
    I: float  # noqa: E741
    W: float
    B: float
    activation: float = 0
    saves_input: float = 0
    saves_output: float = 0
    w_store: float = 0
    output: float = 0
    params: float = 0
    grads: float = 0
    optimizer: float = 0


def _prefix(values: Sequence[float]) -> list[float]:
    return [0.0, *accumulate(values)]


class StageSlicer:
    """Stage figures of any contiguous slice of the units in O(1) (prefix sums).

    ``overhead`` is the runtime's own time per action of each kind (F, I, W, B), added once to each
    stage's op cost (an action runs a whole stage, however many units it holds)."""

    _FIELDS = ("F", "I", "W", "B", "activation", "w_store", "params", "grads", "optimizer")

    def __init__(self, units: Sequence[Unit], overhead: Sequence[float] = (0.0, 0.0, 0.0, 0.0)):
        if not units:
            raise CostModelError("no units to cut; profile a model with at least one layer")
        self.units = tuple(units)
        self.overhead = dict(zip(("F", "I", "W", "B"), overhead))
        self._sums = {name: _prefix([getattr(u, name) for u in units]) for name in self._FIELDS}
        shared = [0.0] + [min(units[i - 1].saves_output, units[i].saves_input) for i in range(1, len(units))]
        self._shared = _prefix(shared)

    def __len__(self) -> int:
        return len(self.units)

    def total(self, name: str, start: int, stop: int) -> float:
        sums = self._sums[name]
        return sums[stop] - sums[start]

    def activation(self, start: int, stop: int) -> float:
        """Saved bytes of units [start, stop): each unit's, less what neighbours inside the slice share."""
        return self.total("activation", start, stop) - (self._shared[stop] - self._shared[start + 1])

    def op_time(self, kind: str, start: int, stop: int) -> float:
        """One action of ``kind`` ("F", "I", "W" or "B") running units [start, stop), overhead included."""
        return self.total(kind, start, stop) + self.overhead[kind]

    def stage_cost(self, start: int, stop: int) -> StageCost:
        return StageCost(F=self.op_time("F", start, stop), I=self.op_time("I", start, stop),
                         W=self.op_time("W", start, stop), B=self.op_time("B", start, stop))

    def stage_memory(self, start: int, stop: int) -> StageMemory:
        return StageMemory(params=self.total("params", start, stop), grads=self.total("grads", start, stop),
                           optimizer=self.total("optimizer", start, stop), activation=self.activation(start, stop),
                           w_store=self.total("w_store", start, stop), saves_input=self.units[start].saves_input,
                           saves_output=self.units[stop - 1].saves_output)

    def boundary_bytes(self, bounds: Sequence[int]) -> tuple[float, ...]:
        return tuple(self.units[b - 1].output for b in bounds[1:-1])

    def cost_model(self, bounds: Sequence[int], *, link: Link, overhead: float = 0.0,
                   pair_factor: float = 1.0) -> StageCostModel:
        """The :class:`StageCostModel` of the cut ``bounds``."""
        return StageCostModel(
            stages=tuple(self.stage_cost(a, b) for a, b in zip(bounds, bounds[1:])),
            boundary_bytes=self.boundary_bytes(bounds), link=link, overhead=overhead, pair_factor=pair_factor,
        )

    def memory(self, bounds: Sequence[int]) -> list[StageMemory]:
        return [self.stage_memory(a, b) for a, b in zip(bounds, bounds[1:])]


def uniform_bounds(num_units: int, num_stages: int) -> tuple[int, ...]:
    """Contiguous parts whose sizes differ by at most one, larger parts first (as ``split_stages``)."""
    base, extra = divmod(num_units, num_stages)
    sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
    return (0, *accumulate(sizes))


def _balanced_bounds(slicer: StageSlicer, num_stages: int) -> tuple[int, ...]:
    """Cuts nearest to equal forward+backward work per stage (a starting point for the search)."""
    n = len(slicer)
    total = slicer.total("F", 0, n) + slicer.total("B", 0, n)
    bounds = [0]
    for stage in range(1, num_stages):
        target = total * stage / num_stages
        low, high = bounds[-1] + 1, n - (num_stages - stage)
        best = min(range(low, high + 1),
                   key=lambda b: abs(slicer.total("F", 0, b) + slicer.total("B", 0, b) - target))
        bounds.append(best)
    return tuple(bounds + [n])


@dataclass(frozen=True, slots=True)
class CutResult:
    """The best cut found for one schedule."""

    bounds: tuple[int, ...]
    """Unit boundaries, ``0 = b0 < ... < bS = units``."""
    step_time: float
    memory: tuple[RankMemory, ...]
    proven_optimal: bool
    """False when the node budget ran out before the search could prove no other cut is better."""
    nodes: int


class _Search:
    """Branch and bound over the cut (see the module docstring). Stages are cut from both ends of the
    model in turn (0, S-1, 1, S-2, ...), so the ranks holding the first and the last stage (rank 0 holds
    both in a V) are complete early and their exact work bounds the rest."""

    _OPS = ("F", "I", "W", "B")

    def __init__(self, schedule: Schedule, slicer: StageSlicer, link: Link, overhead: float, pair_factor: float,
                 sharding: OptimizerSharding, memory_cap: float | None, max_nodes: int, tolerance: float):
        self.schedule, self.slicer, self.link = schedule, slicer, link
        self.overhead, self.pair_factor = overhead, pair_factor
        self.cap, self.max_nodes, self.keep = memory_cap, max_nodes, 1.0 - tolerance
        self.graph = graph = TimingGraph(schedule)
        self.layout = MemoryLayout(schedule)
        self.num_stages = num_stages = schedule.placement.num_stages
        self.share = share = sharding.optimizer_share
        self.n = n = len(slicer)
        units = slicer.units
        # Per field, the least any one unit of units[l:r] has: what an open stage costs at least.
        values = {name: [getattr(u, name) for u in units] for name in ("activation", "w_store", "output")}
        values.update({name: [getattr(u, name) + slicer.overhead[name] for u in units] for name in self._OPS})
        values["static"] = [u.params + u.grads + u.optimizer * share for u in units]
        values["activation_local"] = [u.activation - u.saves_input for u in units]
        self.floor = {name: _range_min(column) for name, column in values.items()}
        # Work any unit adds to the ranks wherever it lands (the least over the stages it could join): the
        # remaining units' work must be spread over the ranks with open stages.
        holders = [[r for r in range(schedule.num_ranks) if s in graph.work[r]] for s in range(num_stages)]
        volume = [min(sum(graph.stage_work(r, s, u.F, u.I, u.W, u.B, pair_factor) for r in holders[s])
                      for s in range(num_stages)) for u in units]
        self.volume = _prefix(volume)
        self.fixed = [graph.actions_per_rank[r] * overhead for r in range(schedule.num_ranks)]
        order = []
        low, high = 0, num_stages - 1
        while low <= high:
            order.append(low)
            if high != low:
                order.append(high)
            low, high = low + 1, high - 1
        self.order = order
        self.arrays = {name: [0.0] * num_stages
                       for name in (*self._OPS, "activation", "activation_local", "w_store", "static")}
        self.sharding = sharding
        self.hops = [0.0] * max(num_stages - 1, 0)
        self.cut: list[int | None] = [None] * (num_stages + 1)  # cut[s]: where stage s starts
        self.cut[0], self.cut[num_stages] = 0, n
        self.best_time = math.inf
        self.best_bounds: tuple[int, ...] | None = None
        self.nodes = 0
        self.exhausted = False

    # -- evaluation ------------------------------------------------------------------------------------
    def _set_stage(self, stage: int, start: int, stop: int) -> None:
        slicer, arrays = self.slicer, self.arrays
        for name in self._OPS:
            arrays[name][stage] = slicer.op_time(name, start, stop)
        arrays["w_store"][stage] = slicer.total("w_store", start, stop)
        arrays["activation"][stage] = slicer.activation(start, stop)
        arrays["activation_local"][stage] = arrays["activation"][stage] - slicer.units[start].saves_input
        arrays["static"][stage] = (slicer.total("params", start, stop) + slicer.total("grads", start, stop)
                                   + slicer.total("optimizer", start, stop) * self.share)

    def _fill_open(self, low: int, high: int, open_stages: Sequence[int]) -> None:
        """Open stages get the floors of units [low, high); boundaries with an open side the least hop."""
        for name, column in self.arrays.items():
            floor = self.floor[name][low][high]
            for s in open_stages:
                column[s] = floor
        least_hop = self.link.time(self.floor["output"][low][high])
        cut, units = self.cut, self.slicer.units
        for b in range(self.num_stages - 1):
            position = cut[b + 1]
            self.hops[b] = least_hop if position is None else self.link.time(units[position - 1].output)

    def _time(self) -> float:
        a = self.arrays
        return self.graph.makespan(a["F"], a["I"], a["W"], a["B"], self.hops, overhead=self.overhead,
                                   pair_factor=self.pair_factor)

    def _bound(self, closed: set[int], low: int, high: int) -> float:
        """A lower bound of the step of every completion: the larger of the simulated step with the open
        stages at their floors, and the level the ranks with open stages reach when the least work of the
        units still to place is poured over them, each from its earliest start plus its closed stages' work."""
        a, graph = self.arrays, self.graph
        time, starts = graph.evaluate(a["F"], a["I"], a["W"], a["B"], self.hops, overhead=self.overhead,
                                      pair_factor=self.pair_factor)
        bases = []
        for rank, stages in enumerate(graph.work):
            if all(s in closed for s in stages):
                continue
            known = sum(graph.stage_work(rank, s, a["F"][s], a["I"][s], a["W"][s], a["B"][s], self.pair_factor)
                        for s in stages if s in closed)
            bases.append(starts[rank] + known + self.fixed[rank])
        if bases:
            time = max(time, _water_level(bases, self.volume[high] - self.volume[low]))
        return time

    def _may_fit(self) -> bool:
        """False when even the floors of the open stages overflow some rank (a lower bound of memory: a
        stage whose input is handed over on its own rank is counted without its saved input)."""
        if self.cap is None:
            return True
        a, layout = self.arrays, self.layout
        for rank, stages in enumerate(layout.stages):
            activation = a["activation"]
            if any(layout.local_inputs[rank]):
                activation = list(activation)
                for stage, local in zip(stages, layout.local_inputs[rank]):
                    if local:
                        activation[stage] = a["activation_local"][stage]
            total = sum(a["static"][s] for s in stages) + layout.peak_activations(rank, activation, a["w_store"])
            if total > self.cap:
                return False
        return True

    def _memory(self, bounds: Sequence[int]) -> tuple[RankMemory, ...]:
        slicer = self.slicer
        return estimate_memory(self.schedule, slicer.memory(bounds), boundary_bytes=slicer.boundary_bytes(bounds),
                               sharding=self.sharding, layout=self.layout)

    # -- the search --------------------------------------------------------------------------------------
    def consider(self, bounds: Sequence[int]) -> None:
        """Evaluate a complete cut and keep it if it fits and is faster."""
        for stage, (a, b) in enumerate(zip(bounds, bounds[1:])):
            self._set_stage(stage, a, b)
        for b in range(self.num_stages - 1):
            self.hops[b] = self.link.time(self.slicer.units[bounds[b + 1] - 1].output)
        if self.cap is not None and max(rank.total for rank in self._memory(bounds)) > self.cap:
            return
        time = self._time()
        if time < self.best_time:
            self.best_time, self.best_bounds = time, tuple(bounds)

    def run(self, start_points: Sequence[Sequence[int]]) -> None:
        for bounds in start_points:
            self.consider(bounds)
        self._branch(0, 0, self.n, set())

    def _branch(self, depth: int, low: int, high: int, closed: set[int]) -> None:
        """Cut stage ``order[depth]`` out of the open units [low, high)."""
        stage = self.order[depth]
        left = depth % 2 == 0  # even depths cut from the left end, odd ones from the right
        open_after = [s for s in self.order[depth + 1:]]
        if not open_after:
            self.consider(self._bounds_with(stage, low, high))
            return
        room = len(open_after)
        stops = range(low + 1, high - room + 1) if left else range(high - 1, low + room - 1, -1)
        closed_now = closed | {stage}
        for edge in stops:
            if self.nodes >= self.max_nodes:
                self.exhausted = True
                return
            self.nodes += 1
            start, stop = (low, edge) if left else (edge, high)
            if left:
                self.cut[stage + 1] = edge
            else:
                self.cut[stage] = edge
            self._set_stage(stage, start, stop)
            rest = (edge, high) if left else (low, edge)
            self._fill_open(*rest, open_after)
            if self._may_fit() and self._bound(closed_now, *rest) < self.best_time * self.keep:
                self._branch(depth + 1, *rest, closed_now)
        # Forget this stage's cut: the caller's next candidate must see it open again.
        if left:
            self.cut[stage + 1] = None
        else:
            self.cut[stage] = None

    def _bounds_with(self, stage: int, low: int, high: int) -> tuple[int, ...]:
        """The complete cut once the last open stage takes units [low, high)."""
        cut = list(self.cut)
        cut[stage], cut[stage + 1] = low, high
        return tuple(cut)


def _water_level(bases: Sequence[float], volume: float) -> float:
    """The lowest level L with sum(max(0, L - base)) = volume: the least possible maximum of base + share
    when ``volume`` is shared out freely."""
    levels = sorted(bases)
    level, remaining = levels[0], volume
    for filled in range(1, len(levels) + 1):
        nxt = levels[filled] if filled < len(levels) else math.inf
        need = (nxt - level) * filled
        if need >= remaining:
            return level + remaining / filled
        remaining -= need
        level = nxt
    return level


def _range_min(values: Sequence[float]) -> list[list[float]]:
    """``table[low][high]`` = min(values[low:high]) (inf when empty)."""
    n = len(values)
    table = [[math.inf] * (n + 1) for _ in range(n + 1)]
    for low in range(n):
        least = math.inf
        for high in range(low + 1, n + 1):
            least = min(least, values[high - 1])
            table[low][high] = least
    return table


def search_cuts(
    schedule: Schedule,
    units: Sequence[Unit] | StageSlicer,
    *,
    link: Link = Link(),
    overhead: float = 0.0,
    pair_factor: float = 1.0,
    sharding: OptimizerSharding = OptimizerSharding(),
    memory_cap: float | None = None,
    max_nodes: int = 200_000,
    tolerance: float = 1e-3,
) -> CutResult | None:
    """The cut of ``units`` into ``schedule``'s stages with the shortest simulated step whose every rank
    fits ``memory_cap`` bytes (None: no cap); None when no cut fits."""
    slicer = units if isinstance(units, StageSlicer) else StageSlicer(units)
    num_stages = schedule.placement.num_stages
    if len(slicer) < num_stages:
        raise CostModelError(
            f"{schedule.name} on {schedule.num_ranks} ranks cuts the model into {num_stages} stages but the profile "
            f"has {len(slicer)} cuttable units; use fewer pipeline ranks or a model with more layers"
        )
    if not 0 <= tolerance < 1:
        raise CostModelError(f"tolerance={tolerance!r} must be in [0, 1); 0 proves the exact optimum")
    search = _Search(schedule, slicer, link, overhead, pair_factor, sharding, memory_cap, max_nodes, tolerance)
    search.run([uniform_bounds(len(slicer), num_stages), _balanced_bounds(slicer, num_stages)])
    if search.best_bounds is None:
        return None
    bounds = search.best_bounds
    return CutResult(bounds, search.best_time, search._memory(bounds), not search.exhausted, search.nodes)
