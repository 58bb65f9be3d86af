"""Arguments shared by the schedule sub-commands."""

from __future__ import annotations

import argparse

from dualpipe_plugin.schedules import CostModel, Schedule, build_schedule, schedule_names

__all__ = ["add_schedule_arguments", "schedule_from_args", "add_cost_argument", "costs_from_args"]


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"schedule: {', '.join(schedule_names())}")
    parser.add_argument("--ranks", "-P", type=int, required=True, help="pipeline ranks P")
    parser.add_argument(
        "--microbatches", "-C", type=int, required=True,
        help="micro-batches per step in total (dualpipe feeds half from each end)",
    )


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    return build_schedule(args.name, args.ranks, args.microbatches)


def add_cost_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cost", default="F=1,B=2,W=1",
        help="per-chunk op costs, e.g. F=1,B=2,W=1[,I=1][,FB=3][,comm=0.1] (I defaults to B-W, FB to F+B)",
    )


def costs_from_args(args: argparse.Namespace) -> CostModel:
    return CostModel.parse(args.cost)
