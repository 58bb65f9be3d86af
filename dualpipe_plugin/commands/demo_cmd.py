"""``dualpipe-plugin demo``: show DualPipeV at a glance: the per-rank op order, the simulated timeline
(PNG + Chrome trace under runs/<timestamp>/) and the bubble against 1F1B and ZB1P at the same size."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dualpipe_plugin.schedules import CostModel, build_schedule, simulate
from dualpipe_plugin.schedules.advise import scale_costs
from dualpipe_plugin.schedules.render import write_chrome_trace, write_timeline_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", default="dualpipev")
    parser.add_argument("--ranks", "-P", type=int, default=4)
    parser.add_argument("--microbatches", "-C", type=int, default=10)
    parser.add_argument("--cost", default="F=1,B=2,W=1,FB=3")
    parser.add_argument("--runs-dir", default="runs", help="where runs/<timestamp>/ is created")


def run(args: argparse.Namespace) -> int:
    costs = CostModel.parse(args.cost)
    schedule = build_schedule(args.schedule, args.ranks, args.microbatches)
    result = simulate(schedule, scale_costs(costs, args.ranks / schedule.placement.num_stages))
    out = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    title = f"{schedule.name}  P={schedule.num_ranks}  C={schedule.num_microbatches}  ({args.cost})"
    png = write_timeline_png(result.timed_rows(), out / "timeline.png", title)
    trace = write_chrome_trace(result.timed_rows(), out / "trace.json", title)
    print(f"{title}\n")
    print(schedule.to_text())
    print(f"\nsimulated makespan {result.makespan:g}, bubble {result.bubble:g}, "
          f"peak activations per rank {list(result.peak_activations_per_rank)}")
    print(f"\nthe same model on {args.ranks} ranks (--cost is per 1/{args.ranks} of the model; a dualpipev "
          f"chunk is half that):")
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        try:
            other_schedule = build_schedule(name, args.ranks, args.microbatches)
        except ValueError as error:
            print(f"  {name:10s} n/a ({str(error).split(';')[0]})")
            continue
        stages = other_schedule.placement.num_stages
        other = simulate(other_schedule, scale_costs(costs, args.ranks / stages))
        print(f"  {name:10s} {stages:2d} stages  makespan {other.makespan:7g}  bubble {other.bubble:6g}  "
              f"peak activations {max(other.peak_activations_per_rank)} chunks of 1/{stages} of the model")
    print(f"\nwrote {png} and {trace} (open the trace in chrome://tracing or ui.perfetto.dev)")
    return 0
