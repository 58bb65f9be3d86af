"""DeepSpeed's own MoE layer in our dualpipev, overlap on vs off, next to DeepSpeed's TrainSchedule.

One invocation, P=2 x EP=2 = 4 gloo processes, three engines built by ``deepspeed.initialize`` on the
same ``PipelineModule`` (``dualpipe_plugin/bench/deepspeed_moe.py``: blocks holding a
``deepspeed.moe.layer.MoE``, emulated compute, real all-to-alls of DeepSpeed's dispatch buffers):
DeepSpeed's TrainSchedule, ours with ``"pipeline": {"schedule": "dualpipev"}`` and ours with
``"overlap": true`` as well. Steps are interleaved (TrainSchedule, off, on, TrainSchedule, ...) so the
box's load hits all three alike; each figure is the median of the per-round ratios::

    .venv/bin/python benchmarks/deepspeed_moe_overlap.py                          # prints JSON
    .venv/bin/python benchmarks/deepspeed_moe_overlap.py --out benchmarks/results/deepspeed_moe_overlap.json

``a2a_ms`` is one all-to-all of a block's dispatch buffer measured on its own (each block's forward has
two, its input-gradient part two more). A benchmark, not a test: no unit test asserts its timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(config) -> dict:
    from dualpipe_plugin.bench.deepspeed_moe import ENGINES, run_rank
    from dualpipe_plugin.bench.machine import machine_facts
    from dualpipe_plugin.launch import run_local

    before = machine_facts()
    result = run_local(run_rank, config.world, args=(config,), timeout_s=1800)[0]
    times = result["times_ms"]

    def paired(kind: str, over: str = "train_schedule") -> float:
        return round(statistics.median(a / b for a, b in zip(times[kind], times[over])), 4)

    return {
        "benchmark": "deepspeed_moe_overlap",
        "what": "train_batch step time, DeepSpeed MoE layers, emulated compute, real gloo all-to-all, engines "
                "interleaved in one run",
        "median_ms": {kind: round(statistics.median(times[kind]), 1) for kind in ENGINES},
        "paired_ratio_to_train_schedule": {kind: paired(kind) for kind in ENGINES},
        "overlap_on_over_off": paired("ours_overlap_on", "ours_overlap_off"),
        "overlap_engine_used": result["overlap_engine"],
        "a2a_ms": round(result["a2a_ms"], 2),
        "times_ms": {kind: [round(v, 1) for v in times[kind]] for kind in ENGINES},
        "config": asdict(config),
        "machine_at_start": before,
        "load_average_at_end": machine_facts()["load_average_1m_5m_15m"],
    }


def main(argv: list[str] | None = None) -> int:
    from dualpipe_plugin.bench.deepspeed_moe import MoEBenchConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = MoEBenchConfig()
    for field in fields(MoEBenchConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    config = MoEBenchConfig(**{f.name: getattr(args, f.name) for f in fields(MoEBenchConfig)})
    report = json.dumps(run(config), indent=2) + "\n"
    sys.stdout.write(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
