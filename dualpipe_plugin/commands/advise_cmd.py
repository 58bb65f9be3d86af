"""``dualpipe-plugin advise``: rank the schedules; from a cost file, also choose C and where to cut.

Without a profile (uniform costs per chunk, memory in activation units)::

    dualpipe-plugin advise --ranks P --microbatches C --cost F=..,B=..,W=..[,FB=..] [--memory-cap N] [--json]

From a cost file written by ``dualpipe-plugin profile`` (measured costs, memory in bytes)::

    dualpipe-plugin advise --profile costs.json --ranks P --microbatches 8,16 [--memory-cap 80GiB]
        [--zero-stage 1 --data-parallel 8 | --distributed-optimizer --data-parallel 8] [--schedules a,b] [--json]
"""

from __future__ import annotations

import argparse
import json
import math

from dualpipe_plugin.cli import UsageError
from dualpipe_plugin.commands.common import add_cost_argument, check_size, costs_from_args
from dualpipe_plugin.schedules.advise import advise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", "-P", type=int, required=True, help="pipeline ranks P")
    parser.add_argument("--microbatches", "-C", required=True,
                        help="micro-batches per step; with --profile a comma list of counts to choose from")
    add_cost_argument(parser)
    parser.add_argument(
        "--memory-cap", default=None,
        help="most memory per rank: in activation units (micro-batch activations of 1/P of the model; 1F1B peaks "
             "at P), or with --profile in bytes (80GiB, 512MiB, 1.5GB)",
    )
    parser.add_argument("--profile", default=None, metavar="COSTS.json",
                        help="a cost file from dualpipe-plugin profile: measured costs, memory in bytes, and the cut")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1),
                        help="with --profile: DeepSpeed ZeRO stage (1 shards the optimizer over --data-parallel)")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="with --profile: Megatron's distributed optimizer (shards it over --data-parallel)")
    parser.add_argument("--data-parallel", type=int, default=1, help="with --profile: data-parallel replicas")
    parser.add_argument("--schedules", default=None, help="with --profile: only these schedules (comma list)")
    parser.add_argument("--max-nodes", type=int, default=20_000,
                        help="with --profile: cut-search budget per schedule and C (default 20000)")
    parser.add_argument("--json", action="store_true")


def _counts(raw: str, many: bool) -> list[int]:
    values = []
    for item in raw.split(","):
        try:
            values.append(int(item))
        except ValueError:
            raise UsageError(f"--microbatches {raw!r}: give a whole number" + (" or a comma list, e.g. 8,16"
                                                                               if many else "")) from None
    if len(values) != 1 and not many:
        raise UsageError(f"--microbatches {raw!r}: without --profile give one count (a list needs a cost file)")
    return values


def _float(raw: str, option: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"{option} {raw!r} is not a number") from None


def run(args: argparse.Namespace) -> int:
    if args.profile is not None:
        return _run_profile(args)
    (microbatches,) = _counts(args.microbatches, many=False)
    check_size(args.ranks, microbatches)
    cap = None if args.memory_cap is None else _float(args.memory_cap, "--memory-cap")
    advice = advise(args.ranks, microbatches, costs_from_args(args), cap)
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


def _run_profile(args: argparse.Namespace) -> int:
    from dualpipe_plugin.schedules.cost_file import load_costs
    from dualpipe_plugin.schedules.memory import OptimizerSharding
    from dualpipe_plugin.schedules.plan import format_bytes, parse_bytes, plan

    counts = _counts(args.microbatches, many=True)
    for count in counts:
        check_size(args.ranks, count)
    if args.max_nodes < 1:
        raise UsageError(f"--max-nodes must be >= 1, got {args.max_nodes}")
    profile = load_costs(args.profile)
    cap = None if args.memory_cap is None else parse_bytes(args.memory_cap)
    sharding = OptimizerSharding(data_parallel=args.data_parallel, zero_stage=args.zero_stage,
                                 distributed_optimizer=args.distributed_optimizer)
    names = [name.strip() for name in args.schedules.split(",")] if args.schedules else None
    result = plan(profile, args.ranks, counts, memory_cap=cap, sharding=sharding, schedules=names,
                  max_nodes=args.max_nodes)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0 if result.best is not None else 1
    print(result.explain())
    print("\n  schedule     C   step (ms)   per mb   uniform    peak memory  note")
    for c in result.ranking:
        if c.result is None:
            print(f"  {c.schedule:10s} {c.microbatches:3d}  {'-':>9s}  {'-':>7s}  {'-':>8s}  {'-':>12s}  {c.reason}")
            continue
        peak = max(m.total for m in c.result.memory)
        uniform = f"{c.uniform_step_time:8.1f}" if c.uniform_step_time is not None else f"{'-':>8s}"
        note = "" if c.result.proven_optimal else "best found (budget)"
        per = c.result.step_time / c.microbatches
        print(f"  {c.schedule:10s} {c.microbatches:3d}  {c.result.step_time:9.1f}  {per:7.2f}  {uniform}  "
              f"{format_bytes(peak):>12s}  {note}")
    return 0 if result.best is not None and math.isfinite(result.best.result.step_time) else 1
