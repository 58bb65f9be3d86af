"""``bench compare``'s command line: ``dualpipe-plugin bench compare`` (arguments to a
:class:`~dualpipe_plugin.bench.compare.config.CompareConfig`, then the run) and
``python -m dualpipe_plugin.bench.compare readme [results.json]`` (the README table from a results file)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from dualpipe_plugin.bench.compare.config import CompareConfig
from dualpipe_plugin.bench.compare.report import README_BEGIN, README_END, update_readme
from dualpipe_plugin.bench.compare.run import run_compare

__all__ = ["run_from_args", "main"]


def _repo_root() -> Path:
    """The checkout holding this package when there is one (benchmarks/ next to it), else the current dir."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "benchmarks").is_dir() else Path.cwd()


def run_from_args(args: argparse.Namespace) -> dict:
    """``bench compare``: ``--quick`` (one round, 1 warm-up and 2 measured steps per job, < 5 min),
    ``--steps`` (measured steps per job in full mode, which warms up with 2), ``--ranks``/``--microbatches``,
    ``--emulate`` (per-layer costs); ``--out`` also writes the JSON there."""
    from dualpipe_plugin.schedules import SCHEDULES, CostModel

    costs = CostModel.parse(args.emulate)
    for spec in SCHEDULES.values():  # every schedule of ours is compared: bad sizes fail before spawning
        spec.check(args.ranks, args.microbatches)
    root = _repo_root()
    if args.quick:
        config = CompareConfig(quick=True, rounds=1, steps=2, moe_steps=2, warmup=1, readme=None)
    else:
        config = CompareConfig(steps=max(1, args.steps), moe_steps=max(1, min(args.steps, 3)))
    config = replace(config, ranks=args.ranks, microbatches=args.microbatches, forward_ms=costs.F,
                     backward_ms=costs.B, weight_ms=costs.W, results_dir=str(root / "benchmarks" / "results"),
                     readme=None if config.readme is None else str(root / "README.md"))
    return run_compare(config)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dualpipe_plugin.bench.compare readme [results.json]``: regenerate the README table."""
    parser = argparse.ArgumentParser(description="bench compare helpers")
    parser.add_argument("action", choices=["readme"])
    parser.add_argument("results", nargs="?", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    root = _repo_root()
    results = json.loads(Path(args.results or root / "benchmarks" / "results" / "compare.json").read_text())
    readme = args.readme or root / "README.md"
    if not update_readme(results, readme):
        print(f"{readme} has no {README_BEGIN} / {README_END} markers", file=sys.stderr)
        return 1
    print(f"updated {readme}")
    return 0

