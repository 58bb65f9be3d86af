"""How long the pure-Python schedule layer takes on a big pipeline: build, validate, simulate.

The issue's bar: dualpipev with P=64 ranks and C=512 micro-batches is built, validated and simulated in
under 1 s. This script times each phase separately (median of ``--repeats`` runs) and the three together,
prints a table and records the figures with the interpreter and the date::

    .venv/bin/python benchmarks/schedule_speed.py            # writes benchmarks/results/schedule_speed.json
    .venv/bin/python benchmarks/schedule_speed.py --ranks 8 --microbatches 64 --out /tmp/small.json

It is a benchmark, not a test: the timing depends on the machine, so no unit test asserts it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dualpipe_plugin.schedules import CostModel, build_schedule, simulate, validate

RESULTS = Path(__file__).resolve().parent / "results" / "schedule_speed.json"
BUDGET_S = 1.0


def _time(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def measure(name: str, ranks: int, microbatches: int, repeats: int) -> dict:
    costs = CostModel(F=1, B=2, W=1, FB=3)
    # simulate() validates on the way, so "build+simulate" is the cheapest complete check-and-measure;
    # "total" is the build + validate + simulate, validation thus running twice.
    phases: dict[str, list[float]] = {"build": [], "validate": [], "simulate": [], "total": [], "build+simulate": []}
    for _ in range(repeats):
        t_build, schedule = _time(lambda: build_schedule(name, ranks, microbatches))
        t_validate, _ = _time(lambda: validate(schedule))
        t_simulate, result = _time(lambda: simulate(schedule, costs))
        total = t_build + t_validate + t_simulate
        for key, value in zip(phases, (t_build, t_validate, t_simulate, total, t_build + t_simulate)):
            phases[key].append(value)
    ops = sum(len(list(schedule.ops(rank))) for rank in range(schedule.num_ranks))
    return {
        "schedule": name,
        "ranks": ranks,
        "microbatches": microbatches,
        "ops": ops,
        "actions": sum(len(row) for row in schedule.actions),
        "repeats": repeats,
        "median_s": {key: statistics.median(values) for key, values in phases.items()},
        "min_s": {key: min(values) for key, values in phases.items()},
        "makespan": result.makespan,
        "bubble": result.bubble,
        "budget_s": BUDGET_S,
    }


def phases_in_order(record: dict) -> list[str]:
    return list(record["median_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="dualpipev")
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON record")
    args = parser.parse_args(argv)

    record = measure(args.schedule, args.ranks, args.microbatches, args.repeats)
    record.update(
        python=platform.python_version(),
        implementation=platform.python_implementation(),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        load_average_1m=os.getloadavg()[0],  # other work on a shared box slows every phase
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    print(
        f"{record['schedule']} P={record['ranks']} C={record['microbatches']}: {record['ops']} ops in "
        f"{record['actions']} actions; median of {record['repeats']} (Python {record['python']})"
    )
    print(f"  {'phase':<15} {'median s':>10} {'min s':>10}")
    for phase in phases_in_order(record):
        print(f"  {phase:<15} {record['median_s'][phase]:>10.4f} {record['min_s'][phase]:>10.4f}")
    verdict = "within" if record["median_s"]["total"] < BUDGET_S else "OVER"
    print(f"  total is {verdict} the {BUDGET_S:g} s budget")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
