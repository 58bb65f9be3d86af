"""The ``dualpipe-plugin`` command line: one sub-command per module under ``dualpipe_plugin.commands``.

Exit status 0 on success, 2 for bad input (one line on stderr naming the problem and the fix, never a
traceback), 1 for a failure at run time. Sub-command modules are imported only when chosen, so
``dualpipe-plugin schedule`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from dualpipe_plugin.distributed import print_error_line

__all__ = ["main", "UsageError"]

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
_COMMANDS = (
    ("schedule", "dualpipe_plugin.commands.schedule_cmd", "print a schedule's per-rank op order"),
    ("simulate", "dualpipe_plugin.commands.simulate_cmd", "simulate a schedule: makespan, bubble, peak activations"),
    ("visualize", "dualpipe_plugin.commands.visualize_cmd", "draw a simulated timeline (PNG) or a Chrome trace (JSON)"),
    ("profile", "dualpipe_plugin.commands.profile_cmd", "measure your model's per-layer costs and the pipeline hop into a cost file"),
    ("advise", "dualpipe_plugin.commands.advise_cmd", "rank the schedules for your size, costs and memory cap; with --profile, also where to cut"),
    ("demo", "dualpipe_plugin.commands.demo_cmd", "train a small MoE model with DualPipeV on local CPU processes and show where the time went"),
    ("bench", "dualpipe_plugin.commands.bench_cmd", "benchmark schedules on the emulated device (real gloo ranks)"),
)


class UsageError(ValueError):
    """Bad command-line input that is not a schedule error."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualpipe-plugin",
        description="DualPipe / DualPipeV pipeline schedules: inspect, simulate, visualize, run, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_text in _COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except ValueError as error:  # every user-input error of the package is a ValueError subclass
        print_error_line(f"dualpipe-plugin {args.command}: error: {error}")  # whole, even from many ranks
        return 2
    except OSError as error:  # a path that passed the checks at the door failed later (disk full, removed)
        print_error_line(f"dualpipe-plugin {args.command}: error: {error}; check the paths given and the free space "
                         f"there")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
