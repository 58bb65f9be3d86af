"""``dualpipe-plugin advise --ranks P --microbatches C --cost F=..,B=..,W=..[,FB=..] [--memory-cap N] [--json]``."""

from __future__ import annotations

import argparse
import json

from dualpipe_plugin.commands.common import add_cost_argument, check_size, costs_from_args
from dualpipe_plugin.schedules.advise import advise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", "-P", type=int, required=True, help="pipeline ranks P")
    parser.add_argument("--microbatches", "-C", type=int, required=True, help="micro-batches per step")
    add_cost_argument(parser)
    parser.add_argument(
        "--memory-cap", type=float, default=None,
        help="most activation memory per rank, in micro-batch activations of 1/P of the model (1F1B peaks at P)",
    )
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    check_size(args.ranks, args.microbatches)
    advice = advise(args.ranks, args.microbatches, costs_from_args(args), args.memory_cap)
    if args.json:
        print(json.dumps(advice.to_dict()))
        return 0
    print(advice.explain())
    print("\n  schedule    step time   bubble   peak act.  params  note")
    for c in advice.ranking:
        if c.step_time is None:
            print(f"  {c.schedule:10s}  {'-':>9s}  {'-':>7s}  {'-':>9s}  {'-':>6s}  {c.reason}")
        else:
            print(f"  {c.schedule:10s}  {c.step_time:9g}  {100 * c.bubble_fraction:6.1f}%  {c.peak_activation_units:9g}"
                  f"  {c.parameter_copies:5d}x  {c.reason}")
    return 0 if advice.best is not None else 1
