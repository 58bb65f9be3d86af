"""A schedule's dependency graph frozen in topological order: its step time for many cost sets, fast.

:func:`~dualpipe_plugin.schedules.simulate.simulate` walks a schedule once for one cost model and keeps
every span. A cut search asks the same schedule for its step time under thousands of per-stage cost
sets, so :class:`TimingGraph` does the walk's bookkeeping once (which action waits for which, across
which stage boundary) and then evaluates a cost set as one pass over flat lists.

The step time is the longest path through a graph whose edges do not depend on the costs, so it never
decreases when any cost grows. The cut search relies on this: costs that are lower bounds of the real
ones give a lower bound of the real step time.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from dualpipe_plugin.schedules.ir import OpKind, Pair, Schedule
from dualpipe_plugin.schedules.lowering import op_events
from dualpipe_plugin.schedules.structure import check_structure

__all__ = ["TimingGraph"]

_KIND_INDEX = {OpKind.F: 0, OpKind.I: 1, OpKind.W: 2, OpKind.B: 3}


class TimingGraph:
    """The longest-path evaluator of one schedule (see the module docstring)."""

    def __init__(self, schedule: Schedule):
        check_structure(schedule)
        placement = schedule.placement
        self.schedule = schedule
        self.num_stages = placement.num_stages
        index_of: dict[tuple[int, int], int] = {}
        nodes = []  # (rank, step, action, stages)
        producer: dict[tuple, int] = {}
        # A pair timed half by half (see evaluate) needs each of its halves' inputs at a different moment and
        # hands its forward outputs (its first op's event) on before it ends: edges say which half they feed
        # and whether they leave a pair's forward half.
        pair_forward_events = set()
        for rank in range(schedule.num_ranks):
            for step, action in enumerate(schedule.actions[rank]):
                index_of[(rank, step)] = len(nodes)
                stages = tuple(placement.stage(rank, op.chunk) for op in action.ops())
                nodes.append((rank, step, action, stages))
                for op in action.ops():
                    flow, stage, _, next_hop = placement.slot(rank, op.chunk)
                    event = op_events(flow, stage, next_hop is not None, op)[1]
                    producer[event] = len(nodes) - 1
                    if isinstance(action, Pair) and op is action.forward:
                        pair_forward_events.add(event)
        predecessors: list[list[tuple[int, int, bool, bool]]] = [[] for _ in nodes]
        successors: list[list[int]] = [[] for _ in nodes]
        for node, (rank, step, action, _) in enumerate(nodes):
            if step:
                predecessors[node].append((index_of[(rank, step - 1)], -1, False, False))
            for index, op in enumerate(action.ops()):
                flow, stage, _, next_hop = placement.slot(rank, op.chunk)
                for need in op_events(flow, stage, next_hop is not None, op)[0]:
                    source = producer[need]
                    if source == node:
                        continue
                    local = nodes[source][0] == rank
                    boundary = -1 if local else (need[2] if need[0] == "F" else need[2] - 1)
                    predecessors[node].append((source, boundary, need in pair_forward_events, index == 1))
            for source, *_ in predecessors[node]:
                successors[source].append(node)
        waiting = [len(p) for p in predecessors]
        ready = deque(node for node, count in enumerate(waiting) if count == 0)
        order = []
        while ready:
            node = ready.popleft()
            order.append(node)
            for nxt in successors[node]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    ready.append(nxt)
        if len(order) != len(nodes):  # the structure checks passed, so only a cycle is left
            from dualpipe_plugin.schedules.validate import validate

            validate(schedule)  # raises the deadlock error with the grid
        # Flat per-node data in evaluation order.
        position = {node: i for i, node in enumerate(order)}
        self._preds = [tuple((position[src], *rest) for src, *rest in predecessors[node]) for node in order]
        self._terms = []
        for node in order:
            action, stages = nodes[node][2], nodes[node][3]
            if isinstance(action, Pair):
                self._terms.append(((0, stages[0]), (3, stages[1])))
            else:
                self._terms.append(((_KIND_INDEX[action.kind], stages[0]),))
        self._pairs = [len(terms) == 2 for terms in self._terms]
        self.ranks = [nodes[node][0] for node in order]
        self.num_ranks = schedule.num_ranks
        self._first = [-1] * schedule.num_ranks
        for i, rank in enumerate(self.ranks):
            if self._first[rank] < 0:
                self._first[rank] = i
        # How often each rank runs each kind of op of each stage: its busy time is linear in the costs.
        self.actions_per_rank = [len(row) for row in schedule.actions]
        self.work: list[dict[int, list[int]]] = [{} for _ in range(schedule.num_ranks)]
        for rank, row in enumerate(schedule.actions):
            for action, stages in zip(row, (nodes[index_of[(rank, step)]][3] for step in range(len(row)))):
                if isinstance(action, Pair):
                    self.work[rank].setdefault(stages[0], [0] * 6)[4] += 1
                    self.work[rank].setdefault(stages[1], [0] * 6)[5] += 1
                else:
                    self.work[rank].setdefault(stages[0], [0] * 6)[_KIND_INDEX[action.kind]] += 1

    def makespan(self, *costs: Sequence[float], overhead: float = 0.0, pair_factor: float = 1.0) -> float:
        """Step time for ``costs`` = (F, I, W, B, hops) as :meth:`evaluate` takes them."""
        return self.evaluate(*costs, overhead=overhead, pair_factor=pair_factor)[0]

    def evaluate(
        self,
        F: Sequence[float],
        I: Sequence[float],  # noqa: E741
        W: Sequence[float],
        B: Sequence[float],
        hops: Sequence[float],
        *,
        overhead: float = 0.0,
        pair_factor: float = 1.0,
    ) -> tuple[float, list[float]]:
        """(step time, start of each rank's first action) for per-stage op costs ``F``, ``I``, ``W``, ``B``,
        per-boundary hop times (``hops[s]``: stage s to s+1) and a per-action overhead: the figures
        :func:`simulate` gives for the equivalent StageCostModel (whose pairs, at ``pair_factor`` 1, run
        half by half: see :meth:`~dualpipe_plugin.schedules.stage_costs.StageCostModel.forward_half`)."""
        tables = (F, I, W, B)
        halves = pair_factor == 1.0
        end = [0.0] * len(self._terms)
        out = [0.0] * len(self._terms) if halves else end  # when a pair's forward outputs leave
        finish = 0.0
        for i, terms in enumerate(self._terms):
            start = second = 0.0
            for source, boundary, early, backward_half in self._preds[i]:
                done = out[source] if early else end[source]
                at = done if boundary < 0 else done + hops[boundary]
                if halves and backward_half:
                    if at > second:
                        second = at
                elif at > start:
                    start = at
            if self._pairs[i]:
                forward, backward = F[terms[0][1]], B[terms[1][1]]
                if halves:
                    out[i] = start + forward
                    done = max(start + forward, second) + backward + overhead
                else:
                    done = start + pair_factor * (forward + backward) + overhead
            else:
                kind, stage = terms[0]
                done = start + tables[kind][stage] + overhead
            end[i] = done
            if done > finish:
                finish = done
        starts = [end[i] - self._duration(i, tables, overhead, pair_factor) if i >= 0 else 0.0 for i in self._first]
        return finish, starts

    def _duration(self, i: int, tables: tuple, overhead: float, pair_factor: float) -> float:
        terms = self._terms[i]
        if self._pairs[i]:
            return pair_factor * (tables[0][terms[0][1]] + tables[3][terms[1][1]]) + overhead
        return tables[terms[0][0]][terms[0][1]] + overhead

    def stage_work(self, rank: int, stage: int, F: float, I: float, W: float, B: float,  # noqa: E741
                   pair_factor: float = 1.0) -> float:
        """Time ``rank`` spends computing ``stage`` over the step (overhead aside) for these per-op costs."""
        counts = self.work[rank].get(stage)
        if counts is None:
            return 0.0
        n_f, n_i, n_w, n_b, pair_f, pair_b = counts
        return n_f * F + n_i * I + n_w * W + n_b * B + pair_factor * (pair_f * F + pair_b * B)
