"""``dualpipe-plugin visualize NAME --ranks P --microbatches C [--cost ...] --out timeline.png|trace.json``."""

from __future__ import annotations

import argparse

from dualpipe_plugin.commands.common import add_cost_argument, add_schedule_arguments, costs_from_args, schedule_from_args
from dualpipe_plugin.schedules import simulate
from dualpipe_plugin.schedules.render import write_timeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    add_cost_argument(parser)
    parser.add_argument("--out", required=True, help="output file: *.png for a timeline, *.json for a Chrome trace")


def run(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    result = simulate(schedule, costs_from_args(args))
    title = f"{schedule.name}  P={schedule.num_ranks}  C={schedule.num_microbatches}  bubble={result.bubble:g}"
    path = write_timeline(result.timed_rows(), args.out, title)
    print(f"wrote {path}")
    return 0
