"""What the DeepSpeed path costs over our standalone runtime, and the issue's goals, in ONE ``bench compare`` run.

The entries of ``dualpipe-plugin bench compare`` that decide it (``dualpipe_plugin/bench/compare/``), run
interleaved round by round with their baselines (DeepSpeed's TrainSchedule on each cost model):

* compute: ours dualpipev standalone (``DualPipeline``), ours dualpipev through DeepSpeed
  (``"pipeline": {"schedule": "dualpipev"}``), DeepSpeed TrainSchedule;
* MoE (P=4 x EP=2): ours dualpipev + overlap standalone and through DeepSpeed, DeepSpeed TrainSchedule.

Reported per cost model: each entry's median step and paired ratio to TrainSchedule (the goals: compute
<= 0.86, MoE + overlap <= 0.80 via DeepSpeed), and the DeepSpeed path over the standalone one (paired per
round): its overhead. The compare run's own files go to ``results/deepspeed_overhead/``::

    .venv/bin/python benchmarks/deepspeed_overhead.py                         # 3 rounds, prints JSON
    .venv/bin/python benchmarks/deepspeed_overhead.py --out benchmarks/results/deepspeed_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = {  # cost model: (standalone entry, DeepSpeed entry, goal against TrainSchedule)
    "compute": ("ours:dualpipev", "ours:dualpipev@deepspeed", 0.86),
    "moe": ("ours:dualpipev+overlap@moe", "ours:dualpipev+overlap@deepspeed@moe", 0.80),
}


def summarize(results: dict) -> dict:
    by_key = {row["key"]: row for row in results["entries"]}
    out = {}
    for model, (standalone, deepspeed, goal) in PAIRS.items():
        a, b = by_key[standalone], by_key[deepspeed]
        over = [d / s for d, s in zip(b["round_medians_ms"], a["round_medians_ms"]) if d and s]
        out[model] = {
            "median_ms": {key: by_key[key]["median_ms"] for key in by_key
                          if by_key[key]["cost_model"] == model},
            "ratio_to_train_schedule": {key: by_key[key]["ratio_to_baseline"] for key in by_key
                                        if by_key[key]["cost_model"] == model},
            "paired_ratios_to_train_schedule": {key: by_key[key]["paired_ratios"] for key in (standalone, deepspeed)},
            "deepspeed_over_standalone": round(statistics.median(over), 4) if over else None,
            "deepspeed_minus_standalone_ms": round(b["median_ms"] - a["median_ms"], 1),
            "goal": goal,
            "goal_met": b["ratio_to_baseline"] is not None and b["ratio_to_baseline"] <= goal,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from dualpipe_plugin.bench.compare.config import CompareConfig
    from dualpipe_plugin.bench.compare.run import run_compare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per job (MoE: at most 3)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    only = tuple(key for pair in PAIRS.values() for key in pair[:2])
    config = CompareConfig(quick=True, rounds=args.rounds, steps=args.steps, moe_steps=min(args.steps, 3),
                           warmup=2, readme=None, only=only,
                           results_dir=str(ROOT / "benchmarks" / "results" / "deepspeed_overhead"))
    results = run_compare(config)
    report = {
        "benchmark": "deepspeed_overhead",
        "what": "bench compare entries (one run, rounds interleaved): ours standalone vs ours via DeepSpeed vs "
                "DeepSpeed TrainSchedule, pure compute and MoE",
        "summary": summarize(results),
        "calibration": results["calibration"],
        "machine": results["machine"],
        "load_average_1m_end": results["load_average_1m_end"],
        "jobs": {row["key"]: [{k: run.get(k) for k in ("steps_ms", "load_1m")} for run in row.get("runs", [])]
                 for row in results["entries"]},
        "elapsed_s": results["elapsed_s"],
    }
    text = json.dumps(report, indent=2) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
