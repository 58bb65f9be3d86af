"""``dualpipe-plugin simulate NAME --ranks P --microbatches C [--cost ...] [--json]``."""

from __future__ import annotations

import argparse
import json

from dualpipe_plugin.commands.common import (
    add_cost_argument, add_schedule_arguments, costs_from_args, schedule_from_args, simulate_finite,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    add_cost_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def run(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    result = simulate_finite(schedule, costs_from_args(args))
    figures = {"schedule": schedule.name, "ranks": schedule.num_ranks, "microbatches": schedule.num_microbatches}
    figures.update(result.to_dict())
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{schedule.name}: P={schedule.num_ranks} ranks, C={schedule.num_microbatches} micro-batches, costs {args.cost}")
    print(f"  makespan      {result.makespan:g}")
    print(f"  bubble        {result.bubble:g}  ({100 * result.bubble_fraction:.1f}% of rank-time idle)")
    print("  rank   busy      idle      peak activations")
    for rank in range(schedule.num_ranks):
        print(
            f"  {rank:<6} {result.busy_per_rank[rank]:<9g} {result.idle_per_rank[rank]:<9g} "
            f"{result.peak_activations_per_rank[rank]}"
        )
    return 0
