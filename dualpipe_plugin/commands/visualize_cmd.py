"""``dualpipe-plugin visualize NAME --ranks P --microbatches C [--cost ...] --out timeline.png|trace.json``."""

from __future__ import annotations

import argparse

from dualpipe_plugin.commands.common import (
    add_cost_argument, add_schedule_arguments, costs_from_args, schedule_from_args, simulate_finite,
)
from dualpipe_plugin.commands.paths import check_output_file
from dualpipe_plugin.schedules.render import write_timeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    add_cost_argument(parser)
    parser.add_argument("--out", required=True, help="output file: *.png for a timeline, *.json for a Chrome trace")


def run(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    costs = costs_from_args(args)
    out = check_output_file(args.out, suffixes=(".png", ".json"))  # before any work
    result = simulate_finite(schedule, costs, drawn=out.suffix.lower() == ".png")
    title = f"{schedule.name}  P={schedule.num_ranks}  C={schedule.num_microbatches}  bubble={result.bubble:g}"
    path = write_timeline(result.timed_rows(), out, title)
    print(f"wrote {path}")
    return 0
