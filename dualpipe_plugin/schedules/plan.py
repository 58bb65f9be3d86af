"""The plan from a cost file: which schedule, how many micro-batches, where to cut, and what it will cost.

For every registered schedule that can run on P ranks and every candidate micro-batch count C,
:func:`plan` runs the exact cut search (:func:`~dualpipe_plugin.schedules.cuts.search_cuts`) on the
profiled layers with the measured link and runtime overhead, under the memory cap in bytes, and ranks
the results by simulated time per micro-batch (the step time when one C is given). The chosen plan
prints the settings that apply it in each framework:

* DeepSpeed: ``"pipeline": {"schedule": NAME, "partition_method": "boundaries:0,3,5,..."}`` (layer-spec
  boundaries, read by :mod:`dualpipe_plugin.deepspeed.layout`);
* standalone: ``stage_modules(layers, NAME, num_ranks=P, rank=r, boundaries=(...))``;
* Megatron (a profile of a Megatron model): for a two-chunk schedule
  ``configure_model_config(config, NAME, stage_layers=(...))`` (transformer layers per stage); for a
  one-chunk schedule Megatron's own ``pipeline_model_parallel_layout`` string (``Ettt|tt|tt|tttL``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from dualpipe_plugin.schedules.cost_file import CostProfile, LayerCost
from dualpipe_plugin.schedules.cuts import CutResult, StageSlicer, Unit, search_cuts, uniform_bounds
from dualpipe_plugin.schedules.errors import CostModelError, ScheduleConfigError
from dualpipe_plugin.schedules.memory import OptimizerSharding
from dualpipe_plugin.schedules.registry import get_schedule, schedule_names
from dualpipe_plugin.schedules.simulate import simulate

__all__ = ["PlanCandidate", "Plan", "plan", "profile_units", "format_bytes", "parse_bytes", "megatron_layout",
           "cost_model_of", "profile_slicer"]

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> float:
    """``80GiB``, ``512 MB``, ``1e9`` (bytes) -> bytes; a bad value raises naming the accepted forms."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise CostModelError(f"memory cap {text!r} is not a positive size; write e.g. 80GiB, 512MiB, 1.5GB or a "
                             f"number of bytes")
    return value * _UNITS[unit]


def format_bytes(value: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _merged(layers: Sequence[LayerCost]) -> Unit:
    """One unit from attached layers: times and sizes add, neighbours' shared saves count once."""
    shared = sum(min(a.saves_output_bytes, b.saves_input_bytes) for a, b in zip(layers, layers[1:]))
    return Unit(
        F=sum(x.forward_ms for x in layers), I=sum(x.input_grad_ms for x in layers),
        W=sum(x.weight_grad_ms for x in layers), B=sum(x.backward_ms for x in layers),
        activation=sum(x.activation_bytes for x in layers) - shared,
        saves_input=layers[0].saves_input_bytes, saves_output=layers[-1].saves_output_bytes,
        w_store=sum(x.w_store_bytes for x in layers), output=layers[-1].output_bytes,
        params=sum(x.param_bytes for x in layers), grads=sum(x.grad_bytes for x in layers),
        optimizer=sum(x.optimizer_bytes for x in layers),
    )


def profile_units(profile: CostProfile) -> list[Unit]:
    """The cuttable units of a profile (a layer with what is attached to it)."""
    return [_merged(profile.layers[start:stop]) for start, stop in profile.unit_spans()]


def megatron_layout(stage_units: Sequence[int]) -> str:
    """Megatron's ``pipeline_model_parallel_layout`` for transformer layers per stage (one chunk per rank)."""
    parts = ["t" * count for count in stage_units]
    return "E" + "|".join(parts) + "L"


@dataclass(frozen=True, slots=True)
class PlanCandidate:
    schedule: str
    microbatches: int
    result: CutResult | None
    """None when no cut fits the memory cap (or the schedule cannot run this size: see ``reason``)."""
    reason: str = ""
    uniform_step_time: float | None = None
    """The simulated step with the uniform cut (same number of units per stage), for comparison."""

    @property
    def feasible(self) -> bool:
        return self.result is not None

    @property
    def time_per_microbatch(self) -> float:
        return self.result.step_time / self.microbatches if self.result else math.inf


@dataclass(frozen=True, slots=True)
class Plan:
    profile: CostProfile
    ranks: int
    memory_cap: float | None
    sharding: OptimizerSharding
    ranking: tuple[PlanCandidate, ...]

    @property
    def best(self) -> PlanCandidate | None:
        return self.ranking[0] if self.ranking and self.ranking[0].feasible else None

    def layer_bounds(self, candidate: PlanCandidate) -> tuple[int, ...]:
        return self.profile.layer_bounds(candidate.result.bounds)

    def stage_units(self, candidate: PlanCandidate) -> tuple[int, ...]:
        bounds = candidate.result.bounds
        return tuple(b - a for a, b in zip(bounds, bounds[1:]))

    def apply_lines(self, candidate: PlanCandidate) -> list[str]:
        """How to run ``candidate`` in each framework its profile fits."""
        name, P = candidate.schedule, self.ranks
        if self.profile.source == "megatron":
            counts = self.stage_units(candidate)
            if get_schedule(name).chunks_per_rank > 1:
                return [f"Megatron:   configure_model_config(config, {name!r}, stage_layers={counts})"
                        f"  (transformer layers per stage, stage 0 first)"]
            return [f"Megatron:   pipeline_model_parallel_layout={megatron_layout(counts)!r} in the TransformerConfig "
                    f"(--pipeline-model-parallel-layout), schedule {name!r}"]
        bounds = self.layer_bounds(candidate)
        text = ",".join(map(str, bounds))
        return [
            f'DeepSpeed:  "pipeline": {{"schedule": "{name}", "partition_method": "boundaries:{text}"}}',
            f"standalone: stage_modules(layers, {name!r}, num_ranks={P}, rank=r, boundaries={bounds})",
        ]

    def explain(self) -> str:
        cap = f"a cap of {format_bytes(self.memory_cap)} per rank" if self.memory_cap is not None else "no memory cap"
        head = f"plan for {self.profile.model or 'the profiled model'}: P={self.ranks} ranks, {cap}"
        best = self.best
        if best is None:
            reasons = "; ".join(f"{c.schedule} C={c.microbatches}: {c.reason}" for c in self.ranking)
            return f"{head}\nno schedule fits: {reasons}"
        result = best.result
        peak = max(result.memory, key=lambda m: m.total)
        peak_rank = result.memory.index(peak)
        lines = [head,
                 f"use {best.schedule} with C={best.microbatches} micro-batches: simulated step "
                 f"{result.step_time:.1f} ms, peak memory {format_bytes(peak.total)} on rank {peak_rank}"
                 + ("" if result.proven_optimal else " (cut search stopped at its node budget: best found, "
                    "not proven optimal)")]
        if best.uniform_step_time:
            gain = best.uniform_step_time / result.step_time - 1
            lines.append(f"uniform cuts would take {best.uniform_step_time:.1f} ms ({100 * gain:+.1f}%)")
        spans = self.profile.unit_spans()
        stages = [f"{spans[a][0]}-{spans[b - 1][1] - 1}" for a, b in zip(result.bounds, result.bounds[1:])]
        lines.append("stages (layers): " + " | ".join(stages))
        lines += self.apply_lines(best)
        lines.append("memory per rank (params + grads + optimizer + activations + receive buffers):")
        for rank, m in enumerate(result.memory):
            lines.append(f"  rank {rank}: {format_bytes(m.params)} + {format_bytes(m.grads)} + "
                         f"{format_bytes(m.optimizer)} + {format_bytes(m.activations)} + "
                         f"{format_bytes(m.comm_buffers)} = {format_bytes(m.total)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def entry(c: PlanCandidate) -> dict:
            data = {"schedule": c.schedule, "microbatches": c.microbatches, "feasible": c.feasible,
                    "reason": c.reason, "uniform_step_time_ms": c.uniform_step_time}
            if c.result is not None:
                data.update({
                    "step_time_ms": c.result.step_time, "unit_bounds": list(c.result.bounds),
                    "layer_bounds": list(self.profile.layer_bounds(c.result.bounds)),
                    "proven_optimal": c.result.proven_optimal, "nodes": c.result.nodes,
                    "memory_per_rank": [m.to_dict() for m in c.result.memory],
                })
            return data

        best = self.best
        return {"ranks": self.ranks, "memory_cap_bytes": self.memory_cap,
                "best": None if best is None else entry(best),
                "apply": [] if best is None else self.apply_lines(best),
                "ranking": [entry(c) for c in self.ranking]}


def _uniform_time(schedule, slicer: StageSlicer, profile: CostProfile) -> float:
    bounds = uniform_bounds(len(slicer), schedule.placement.num_stages)
    return simulate(schedule, cost_model_of(profile, slicer, bounds)).makespan


def profile_slicer(profile: CostProfile) -> StageSlicer:
    """The units of a profile, with its runtime overhead per action kind."""
    return StageSlicer(profile_units(profile), overhead=profile.runtime.overhead)


def cost_model_of(profile: CostProfile, slicer: StageSlicer, bounds: Sequence[int]):
    """The :class:`~dualpipe_plugin.schedules.stage_costs.StageCostModel` of a cut of a profile (``slicer``:
    :func:`profile_slicer`)."""
    return slicer.cost_model(bounds, link=profile.link.link(), pair_factor=profile.runtime.pair_factor)


def plan(
    profile: CostProfile,
    ranks: int,
    microbatches: Sequence[int],
    *,
    memory_cap: float | None = None,
    sharding: OptimizerSharding = OptimizerSharding(),
    schedules: Sequence[str] | None = None,
    max_nodes: int = 20_000,
) -> Plan:
    """Rank every schedule x micro-batch count by its best cut's simulated time (see the module docstring)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ScheduleConfigError(f"plan needs at least 1 pipeline rank, got {ranks!r}; give a whole number >= 1")
    if not microbatches:
        raise ScheduleConfigError("plan needs at least one micro-batch count to try")
    if memory_cap is not None and not (math.isfinite(memory_cap) and memory_cap > 0):
        raise CostModelError(f"memory cap must be a positive, finite number of bytes, got {memory_cap}")
    slicer = profile_slicer(profile)
    link = profile.link.link()
    candidates = []
    for name in schedules or schedule_names():
        spec = get_schedule(name)
        for count in microbatches:
            try:
                spec.check(ranks, count)
            except ScheduleConfigError as error:
                candidates.append(PlanCandidate(spec.name, count, None, str(error).split(";")[0]))
                continue
            num_stages = spec.num_stages(ranks)
            if len(slicer) < num_stages:
                candidates.append(PlanCandidate(
                    spec.name, count, None,
                    f"needs {num_stages} stages but the profile has {len(slicer)} cuttable units"))
                continue
            schedule = spec.build(ranks, count)
            result = search_cuts(schedule, slicer, link=link, pair_factor=profile.runtime.pair_factor, sharding=sharding,
                                 memory_cap=memory_cap, max_nodes=max_nodes)
            uniform = _uniform_time(schedule, slicer, profile)
            reason = "" if result is not None else f"no cut fits the memory cap of {format_bytes(memory_cap)}"
            candidates.append(PlanCandidate(spec.name, count, result, reason, uniform))
    ranking = sorted(candidates, key=lambda c: (not c.feasible, c.time_per_microbatch,
                                                max(m.total for m in c.result.memory) if c.result else 0.0))
    return Plan(profile, ranks, memory_cap, sharding, tuple(ranking))


