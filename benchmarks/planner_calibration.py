"""The calibrated simulator against measured steps: profile, simulate, run, compare (goal: within 2%).

    .venv/bin/python benchmarks/planner_calibration.py                    # emulated P=4 C=16 + MoE P=2
    .venv/bin/python benchmarks/planner_calibration.py --only emulated --steps 3 --out /tmp/cal.json

1. **Emulated device, P = 4, C = 16.** The model is ``bench compare``'s: 8 emulated layers, F = I = W =
   10 ms each. It is profiled as ``dualpipe-plugin profile --ranks 4`` does
   (:func:`~dualpipe_plugin.planner.profile.profile_locally`): per-layer times on this process, the hop
   and the runtime's per-action overhead on 4 local gloo processes (the model cut into 4 stages, short
   1F1B and ZB1P steps at C = 8). For dualpipe, dualpipev,
   1f1b, zb1p (and zbv) the simulator predicts the step from that cost file, with the uniform cut the
   run uses, and the real pipeline runs on 4 gloo processes: ``measured / simulated``. Next to it, the
   simulator as before this planner (nominal per-chunk costs, free hops).
2. **The reference MoE model, P = 2** (x EP = 2: 4 processes; 4 blocks with emulated compute and real
   all-to-alls, as ``bench compare``'s MoE entries, overlap off). Profiled by all 4 processes, the two of
   each EP group in lock step (the blocks' all-to-alls need the peer; the box as busy as in the run), the
   overhead on both replicas' pipeline groups at once, then the same comparison. Its blocks' profiled
   times move by several ms between profiles minutes apart here (4 processes on 2 cores), so the model is
   profiled at the start of every round and the simulator takes each time's median over those profiles
   (``round_profiles`` in the result): a profile of the same window the steps are measured in, never the
   measured steps themselves.

Each schedule runs ``--rounds`` times (default 3), the schedules in turn, and the measured step is the
median of the rounds' medians. The dualpipev run of part 1 also draws ``docs/planner_timeline.png``: the
measured timeline (the executor's record of the last step) under the simulated one for the same costs. Results go to
``benchmarks/results/planner_calibration.json`` with the load average before and after. Run it at low
load: the ratios are the runtime's timing on an idle 2-core box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _steps_ms(reports: list[dict]) -> list[float]:
    from dualpipe_plugin.bench.spans import step_times_ms

    return step_times_ms([r["spans"] for r in reports])


def _measured_rows(reports: list[dict]) -> list[list[tuple]]:
    """Per rank (action, start, end) on one clock: each rank's record is relative to its own step start."""
    from dualpipe_plugin.schedules import parse_action

    origin = min(r["started"] for r in reports)
    rows = []
    for report in reports:
        offset = (report["started"] - origin) * 1e3
        rows.append([(parse_action(a), s + offset, e + offset) for a, s, e in report["timeline"]])
    return rows


def _rounds(part: str, names, run_one, predict, rounds: int, profile_one=None) -> dict:
    """Every schedule once per round, rounds in turn (a slow spell of the box spreads over all of them);
    the measured step is the median of the per-round medians. ``profile_one``, if given, profiles the model
    at the start of every round; ``predict()`` gives the simulated steps once every round has run."""
    medians: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, list[list[float]]] = {name: [] for name in names}
    for round_index in range(rounds):
        if profile_one is not None:
            profile_one()
        for name in names:
            times = run_one(name)
            steps[name].append([round(t, 2) for t in times])
            medians[name].append(statistics.median(times))
            print(f"{part:8s} round {round_index} {name:10s} {medians[name][-1]:8.1f} ms", flush=True)
    predicted = predict()
    rows = {}
    for name in names:
        measured = statistics.median(medians[name])
        rows[name] = {"measured_ms": round(measured, 2), "simulated_ms": round(predicted[name], 2),
                      "ratio": round(measured / predicted[name], 4),
                      "round_medians_ms": [round(m, 2) for m in medians[name]], "steps_ms": steps[name]}
        print(f"{part:8s} {name:10s} measured {measured:8.1f} ms  simulated {predicted[name]:8.1f} ms  "
              f"ratio {measured / predicted[name]:.4f}", flush=True)
    return rows


def _simulated(profile, names, ranks: int, microbatches: int) -> dict:
    """Each schedule's simulation from ``profile``, with the uniform cut the runs use."""
    from dualpipe_plugin.schedules import build_schedule, simulate
    from dualpipe_plugin.schedules.cuts import uniform_bounds
    from dualpipe_plugin.schedules.plan import cost_model_of, profile_slicer

    slicer = profile_slicer(profile)
    results = {}
    for name in names:
        schedule = build_schedule(name, ranks, microbatches)
        bounds = uniform_bounds(len(slicer), schedule.placement.num_stages)
        results[name] = simulate(schedule, cost_model_of(profile, slicer, bounds))
    return results


def emulated(args) -> dict:
    from functools import partial

    from dualpipe_plugin.bench.planned import PlannedRun, model_target, run_planned_rank
    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.planner.profile import profile_locally
    from dualpipe_plugin.schedules import CostModel, build_schedule, simulate
    from dualpipe_plugin.schedules.render import write_side_by_side_png

    ranks, microbatches = 4, 16
    profile = profile_locally(partial(model_target, "uniform8"), ranks)
    names = (*GOAL_SCHEDULES, "zbv")
    predicted = _simulated(profile, names, ranks, microbatches)
    nominal = {}
    for name in names:
        schedule = build_schedule(name, ranks, microbatches)
        per_chunk = 8 // schedule.placement.num_stages * 10.0
        nominal[name] = simulate(schedule, CostModel(F=per_chunk, B=2 * per_chunk, W=per_chunk)).makespan
    last_reports = {}

    def run_one(name: str) -> list[float]:
        run = PlannedRun(model="uniform8", schedule=name, microbatches=microbatches, steps=args.steps,
                         record=name == "dualpipev")
        last_reports[name] = run_local(run_planned_rank, ranks, (run,), timeout_s=600)
        return _steps_ms(last_reports[name])

    rows = _rounds("emulated", names, run_one, lambda: {n: p.makespan for n, p in predicted.items()}, args.rounds)
    for name in names:
        rows[name]["uncalibrated_simulated_ms"] = nominal[name]
        rows[name]["uncalibrated_ratio"] = round(rows[name]["measured_ms"] / nominal[name], 4)
    if args.picture:
        measured = rows["dualpipev"]["measured_ms"]
        write_side_by_side_png(
            [("simulated (calibrated costs)", predicted["dualpipev"].timed_rows()),
             ("measured", _measured_rows(last_reports["dualpipev"]))],
            ROOT / "docs" / "planner_timeline.png",
            title=f"dualpipev P={ranks} C={microbatches}: simulated {predicted['dualpipev'].makespan:.0f} ms, "
                  f"measured {measured:.0f} ms",
        )
    return {"profile": profile.to_dict(), "schedules": rows}


def _median_profile(profiles: list):
    """Every layer's times (and the runtime overhead, the link) as the median over ``profiles``; bytes and
    everything else from the first (they do not move between runs)."""
    from dataclasses import replace

    def median_of(items, name):
        return statistics.median(getattr(item, name) for item in items)

    timed = ("forward_ms", "input_grad_ms", "weight_grad_ms", "backward_ms")
    layers = tuple(replace(layer, **{name: median_of([p.layers[i] for p in profiles], name) for name in timed})
                   for i, layer in enumerate(profiles[0].layers))
    runtimes = [p.runtime for p in profiles]
    runtime = replace(runtimes[0], **{kind: median_of(runtimes, kind) for kind in "FIWB"},
                      note=runtimes[0].note + f"; median of {len(profiles)} profiles, one per round")
    links = [p.link for p in profiles]
    link = replace(links[0], latency_ms=median_of(links, "latency_ms"))
    return replace(profiles[0], layers=layers, runtime=runtime, link=link)


def moe(args) -> dict:
    from dualpipe_plugin.bench.planned import MoERun, moe_profile_rank, run_moe_rank
    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.planner.link import measure_link_locally
    from dualpipe_plugin.schedules.cost_file import CostProfile

    ranks, ep = 2, 2
    base = MoERun(ranks=ranks, steps=args.steps)
    profiles = []

    def profile_one() -> None:
        profile = CostProfile.from_dict(run_local(moe_profile_rank, ranks * ep, (base,), timeout_s=600)[0])
        profiles.append(profile.with_link(measure_link_locally(ranks)))

    def predict() -> dict[str, float]:
        simulated = _simulated(_median_profile(profiles), GOAL_SCHEDULES, ranks, base.microbatches)
        return {name: result.makespan for name, result in simulated.items()}

    def run_one(name: str) -> list[float]:
        run = MoERun(schedule=name, ranks=ranks, steps=args.steps)
        return _steps_ms(run_local(run_moe_rank, ranks * ep, (run,), timeout_s=600))

    rows = _rounds("moe", GOAL_SCHEDULES, run_one, predict, args.rounds, profile_one=profile_one)
    return {"profile": _median_profile(profiles).to_dict(), "round_profiles": [p.to_dict() for p in profiles],
            "schedules": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("emulated", "moe"), default=None)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every schedule, in turn")
    parser.add_argument("--no-picture", dest="picture", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner_calibration.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from dualpipe_plugin.bench.machine import machine_facts

    result = {"benchmark": "planner_calibration", "machine": machine_facts(), "load_before": _load()}
    if args.only in (None, "emulated"):
        result["emulated_P4_C16"] = emulated(args)
    if args.only in (None, "moe"):
        result["moe_P2_EP2_C16"] = moe(args)
    result["load_after"] = _load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} (load before {result['load_before']}, after {result['load_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
