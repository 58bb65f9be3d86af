"""``dualpipe-plugin schedule NAME --ranks P --microbatches C``: the text form, one line per rank."""

from __future__ import annotations

import argparse

from dualpipe_plugin.commands.common import add_schedule_arguments, schedule_from_args
from dualpipe_plugin.schedules import validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)


def run(args: argparse.Namespace) -> int:
    schedule = schedule_from_args(args)
    validate(schedule)
    print(schedule.to_text())
    return 0
