"""``dualpipe-plugin bench [step|overlap|compare] ...``: benchmarks on the emulated device (JSON with --json).

``step`` (the default) times one schedule against its simulation; the other modes live in
``dualpipe_plugin.bench`` and are dispatched from here. Every argument, ``--out`` included, is checked
before the first rank starts: a benchmark is never run only to be lost to a bad path.
"""

from __future__ import annotations

import argparse
import importlib
import json

from dualpipe_plugin.cli import UsageError
from dualpipe_plugin.commands.common import check_size, check_steps
from dualpipe_plugin.commands.paths import check_output_file
from dualpipe_plugin.schedules import CostModel, schedule_names

# mode -> (module, function taking the parsed args and returning a JSON-able dict)
_MODES = {
    "step": ("dualpipe_plugin.commands.bench_cmd", "_run_step"),
    "overlap": ("dualpipe_plugin.bench.overlap", "run_from_args"),
    "compare": ("dualpipe_plugin.bench.compare.cli", "run_from_args"),
}
_MAX_OP_MS = 60_000.0
"""The emulated device really waits this long: more per op is a unit mistake, not a benchmark."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", default="step", choices=list(_MODES), help="which benchmark (default: step)")
    parser.add_argument("--schedule", default="dualpipev", help=f"schedule for 'step': {', '.join(schedule_names())}")
    parser.add_argument("--ranks", "-P", type=int, default=4)
    parser.add_argument("--microbatches", "-C", type=int, default=16)
    parser.add_argument(
        "--emulate", default="F=10,B=20,W=10",
        help="emulated per-chunk costs in ms (B is the full backward; I = B - W), e.g. F=10,B=20,W=10",
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after 2 warm-up steps)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and entries (compare)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _check_emulated(text: str) -> CostModel:
    costs = CostModel.parse(text)
    if costs.F <= 0 or costs.B <= 0:
        raise UsageError(f"--emulate {text}: the emulated device needs F > 0 and B > 0 ms to have anything to time; "
                         f"e.g. F=10,B=20,W=10")
    largest = max(costs.F, costs.B, costs.W, costs.pair)
    if largest > _MAX_OP_MS:
        raise UsageError(f"--emulate {text}: an op of {largest:g} ms is more than the {_MAX_OP_MS:g} ms the emulated "
                         f"device allows (it really waits that long); the costs are milliseconds, e.g. F=10,B=20,W=10")
    return costs


def _run_step(args: argparse.Namespace) -> dict:
    from dualpipe_plugin.bench.step import StepBenchConfig, run_step_bench
    from dualpipe_plugin.schedules import build_schedule

    costs = CostModel.parse(args.emulate)
    build_schedule(args.schedule, args.ranks, args.microbatches)  # bad input fails here, before spawning
    config = StepBenchConfig(
        schedule=args.schedule, ranks=args.ranks, microbatches=args.microbatches,
        forward_ms=costs.F, backward_ms=costs.B, weight_ms=costs.W, steps=args.steps,
    )
    return run_step_bench(config)


def run(args: argparse.Namespace) -> int:
    check_steps(args.steps)
    check_size(args.ranks, args.microbatches)
    _check_emulated(args.emulate)
    out = check_output_file(args.out) if args.out else None
    module, function = _MODES[args.mode]
    result = getattr(importlib.import_module(module), function)(args)
    print(json.dumps(result, indent=None if args.json else 2))  # first, so a failing write loses nothing
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as error:
            raise UsageError(f"--out {args.out} cannot be written any more ({error.strerror or error}); the result "
                             f"is printed above") from None
    return 0
