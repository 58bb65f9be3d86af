"""Profile-guided cuts against uniform cuts on a model with heavy ends (goals: >= 10% shorter measured step,
measured within 2% of the simulated optimum), and the same plan run through DeepSpeed and Megatron-Core.

    .venv/bin/python benchmarks/planner_cuts.py            # P=4, C=16, dualpipev; ~4 min here

The model is :func:`~dualpipe_plugin.reference.heavy_ends.emulated_heavy_ends` on the emulated device:
14 blocks of F = I = W = 4 ms and an embedding and an LM head 3x as heavy each, so a V's rank 0, which
holds both ends, carries far more than the others under a uniform cut. The script

1. profiles it as ``dualpipe-plugin profile --ranks 4`` would (the layers here, the hop and the runtime
   overhead on 4 local gloo processes), writing
   ``benchmarks/results/planner_costs_emulated_heavy.json`` (the cost file);
2. asks the planner for dualpipev at P=4, C=16 (``plan``, the exact cut search), and simulates the
   uniform cut with the same costs;
3. runs the uniform and the planned cut with the standalone runtime, then the planned cut through
   DeepSpeed (``"partition_method": "boundaries:..."``) and Megatron-Core (``stage_layers=``), 4 gloo
   processes each, and records measured / simulated and planned / uniform.

Timing: run it at low load (the load average is recorded before and after).
Writes ``benchmarks/results/planner_cuts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="dualpipev")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-frameworks", dest="frameworks", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner_cuts.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from functools import partial

    from dualpipe_plugin.bench.machine import machine_facts
    from dualpipe_plugin.bench.planned import (
        PlannedRun, model_target, run_planned_deepspeed_rank, run_planned_megatron_rank, run_planned_rank,
    )
    from dualpipe_plugin.bench.spans import step_times_ms
    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.planner.profile import profile_locally
    from dualpipe_plugin.schedules.plan import plan

    ranks, microbatches = 4, 16
    load_before = [round(x, 2) for x in os.getloadavg()]
    profile = profile_locally(partial(model_target, "emulated_heavy"), ranks)  # as `profile --ranks 4` does
    profile.save(ROOT / "benchmarks" / "results" / "planner_costs_emulated_heavy.json")
    result = plan(profile, ranks, [microbatches], schedules=[args.schedule])
    best = result.best
    bounds = result.layer_bounds(best)
    print(result.explain(), flush=True)

    def measure(function, boundaries) -> float:
        run = PlannedRun(model="emulated_heavy", schedule=args.schedule, microbatches=microbatches,
                         boundaries=boundaries, steps=args.steps)
        reports = run_local(function, ranks, (run,), timeout_s=900)
        steps = step_times_ms([r["spans"] for r in reports])
        return statistics.median(steps), [round(s, 2) for s in steps], reports

    rows = {}
    for label, function, boundaries, simulated in (
        ("standalone uniform", run_planned_rank, None, best.uniform_step_time),
        ("standalone planned", run_planned_rank, bounds, best.result.step_time),
        *((("DeepSpeed planned", run_planned_deepspeed_rank, bounds, best.result.step_time),
           ("Megatron planned", run_planned_megatron_rank, bounds, best.result.step_time)) if args.frameworks else ()),
    ):
        measured, steps, reports = measure(function, boundaries)
        rows[label] = {"measured_ms": round(measured, 2), "simulated_ms": round(simulated, 2),
                       "ratio": round(measured / simulated, 4), "steps_ms": steps}
        if "parts" in reports[0]:
            rows[label]["deepspeed_parts"] = reports[0]["parts"]
        if "held" in reports[0]:
            rows[label]["megatron_chunks_per_rank"] = [r["held"] for r in reports]
        print(f"{label:20s} measured {measured:8.1f} ms  simulated {simulated:8.1f} ms  "
              f"ratio {measured / simulated:.4f}", flush=True)
    gain = rows["standalone planned"]["measured_ms"] / rows["standalone uniform"]["measured_ms"]
    out = {
        "benchmark": "planner_cuts", "machine": machine_facts(), "load_before": load_before,
        "schedule": args.schedule, "ranks": ranks, "microbatches": microbatches,
        "planned_layer_bounds": list(bounds), "proven_optimal": best.result.proven_optimal,
        "planned_over_uniform_measured": round(gain, 4), "runs": rows,
        "plan": result.to_dict(), "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"planned / uniform (measured) = {gain:.4f}; wrote {path} (load {out['load_before']} -> {out['load_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
