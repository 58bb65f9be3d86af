"""Estimated against measured peak memory per rank, every schedule (goal: within 5%).

    .venv/bin/python benchmarks/planner_memory.py            # P=4, C=8, every registered schedule

The model is real math: :func:`~dualpipe_plugin.reference.heavy_ends.heavy_ends_layers` (a 4096-token
embedding, 6 MLP blocks, a 4096-way head; 8 layers). It is profiled on this process
(:func:`~dualpipe_plugin.planner.profile.profile_model`), then for every schedule the planner picks its
cut (:func:`~dualpipe_plugin.schedules.cuts.search_cuts`, ZeRO-0, AdamW) and estimates each rank's peak;
the pipeline then runs that cut on 4 gloo processes (``stage_modules(..., boundaries=...)``) and each
rank measures what it held (:mod:`dualpipe_plugin.bench.planned`): activations as the peak of a
:class:`~dualpipe_plugin.planner.meter.SavedTensorMeter` over a step (saved tensors and what deferred
weight gradients hold), parameters, gradients and AdamW's state by summing the tensors. Receive buffers
are in the estimate but cannot be seen by hooks on CPU; they are reported apart and left out of the
ratio. No timing is involved: the load does not matter. Writes
``benchmarks/results/planner_memory.json`` and ``docs/planner_memory.png`` (the dualpipev ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("params", "grads", "optimizer", "activations")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner_memory.json"))
    parser.add_argument("--picture", default=str(ROOT / "docs" / "planner_memory.png"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from dualpipe_plugin.bench.machine import machine_facts
    from dualpipe_plugin.bench.planned import PlannedRun, model_layers, run_planned_rank
    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.planner.profile import profile_model
    from dualpipe_plugin.schedules import build_schedule, schedule_names
    from dualpipe_plugin.schedules.cuts import search_cuts
    from dualpipe_plugin.schedules.memory_plot import write_memory_png
    from dualpipe_plugin.schedules.plan import profile_slicer

    _, target = model_layers("heavy")
    profile = profile_model(target, overhead_microbatches=0)
    slicer = profile_slicer(profile)
    result = {"benchmark": "planner_memory", "machine": machine_facts(), "load_before": list(os.getloadavg()),
              "ranks": args.ranks, "microbatches": args.microbatches, "profile": profile.to_dict(), "schedules": {}}
    worst = 0.0
    for name in schedule_names():
        schedule = build_schedule(name, args.ranks, args.microbatches)
        cut = search_cuts(schedule, slicer, link=profile.link.link())
        bounds = profile.layer_bounds(cut.bounds)
        run = PlannedRun(model="heavy", schedule=name, microbatches=args.microbatches, boundaries=bounds,
                         warmup=1, steps=1, memory=True)
        reports = run_local(run_planned_rank, args.ranks, (run,), timeout_s=600)
        ranks = []
        for rank, (estimate, report) in enumerate(zip(cut.memory, reports)):
            measured = report["memory"]
            est = estimate.to_dict()
            ratio = sum(est[k] for k in KINDS) / sum(measured[k] for k in KINDS)
            worst = max(worst, abs(ratio - 1))
            ranks.append({"estimated": est, "measured": measured, "ratio": round(ratio, 4)})
            print(f"{name:10s} rank {rank}: estimated {sum(est[k] for k in KINDS):>10.0f} B  measured "
                  f"{sum(measured[k] for k in KINDS):>10.0f} B  ratio {ratio:.4f}  (activations "
                  f"{est['activations']:.0f} vs {measured['activations']:.0f}; receive buffers "
                  f"{est['comm_buffers']:.0f} not measured)", flush=True)
        result["schedules"][name] = {"layer_bounds": list(bounds), "ranks": ranks}
        if name == "dualpipev" and args.picture:
            write_memory_png([r["estimated"] for r in ranks], [r["measured"] for r in ranks], args.picture,
                             title=f"dualpipev P={args.ranks} C={args.microbatches}, heavy-ends model, cut {bounds}")
    result["worst_deviation"] = round(worst, 4)
    result["load_after"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"worst |estimated / measured - 1| = {worst:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
