"""Arguments shared by the sub-commands, and the checks every command applies to them before any work."""

from __future__ import annotations

import argparse
import math

from dualpipe_plugin.cli import UsageError
from dualpipe_plugin.schedules import (
    CostModel, CostModelError, Schedule, SimResult, build_schedule, schedule_names, simulate,
)

__all__ = [
    "add_schedule_arguments", "schedule_from_args", "add_cost_argument", "costs_from_args", "check_size",
    "check_steps", "simulate_finite", "MAX_SLOTS",
]

MAX_SLOTS = 1_000_000
"""Most ranks x micro-batches the CLI builds: a million slots already take about a minute and gigabytes."""


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"schedule: {', '.join(schedule_names())}")
    parser.add_argument("--ranks", "-P", type=int, required=True, help="pipeline ranks P")
    parser.add_argument(
        "--microbatches", "-C", type=int, required=True,
        help="micro-batches per step in total (dualpipe feeds half from each end)",
    )


def check_size(ranks: int, microbatches: int) -> None:
    """Refuse sizes the CLI cannot build in reasonable time and memory (the schedules judge the rest)."""
    if ranks > 0 and microbatches > 0 and ranks * microbatches > MAX_SLOTS:
        raise UsageError(
            f"--ranks {ranks} x --microbatches {microbatches} = {ranks * microbatches:,} slots is more than the "
            f"{MAX_SLOTS:,} the command line builds; use fewer ranks or micro-batches (a schedule's bubble stops "
            f"changing once C is a few times P)"
        )


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    check_size(args.ranks, args.microbatches)
    return build_schedule(args.name, args.ranks, args.microbatches)


def add_cost_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cost", default="F=1,B=2,W=1",
        help="per-chunk op costs, e.g. F=1,B=2,W=1[,I=1][,FB=3][,comm=0.1] (I defaults to B-W, FB to F+B)",
    )


def costs_from_args(args: argparse.Namespace) -> CostModel:
    return CostModel.parse(args.cost)


def check_steps(steps: int, option: str = "--steps") -> None:
    if steps < 1:
        raise UsageError(f"{option} must be at least 1, got {steps}; give the number of steps to run")


def simulate_finite(schedule: Schedule, costs: CostModel, *, drawn: bool = False) -> SimResult:
    """Simulate, refusing costs so large that the step time overflows to infinity (and, for a timeline to be
    ``drawn``, costs so small that it has no length)."""
    result = simulate(schedule, costs)
    if drawn and result.makespan == 0:
        raise CostModelError("every op costs 0, so the timeline has no length and there is nothing to draw; give "
                             "F and B > 0, e.g. --cost F=1,B=2,W=1")
    if not math.isfinite(result.makespan):
        raise CostModelError(
            f"the costs are so large that {schedule.name}'s simulated step time overflows to {result.makespan} "
            f"(largest cost {max(costs.F, costs.B, costs.pair):g}); express them in a larger unit so the numbers "
            f"are smaller, e.g. ms instead of ns"
        )
    return result
