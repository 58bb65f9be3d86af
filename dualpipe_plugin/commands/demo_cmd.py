"""``dualpipe-plugin demo``: train the reference MoE transformer with DualPipeV (+ overlap) on local CPU
processes, then show where the time went: measured vs simulated bubble per rank, peak activations, and
``runs/<time>/{timeline.png, trace.json, loss.png}``. ``--simulate`` shows the simulated schedule only."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dualpipe_plugin.commands.common import check_size, check_steps, simulate_finite
from dualpipe_plugin.commands.paths import make_output_dir
from dualpipe_plugin.schedules import CostModel, build_schedule, schedule_names
from dualpipe_plugin.schedules.advise import scale_costs
from dualpipe_plugin.schedules.render import write_chrome_trace, write_timeline_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", default="dualpipev")
    parser.add_argument("--ranks", "-P", type=int, default=4, help="pipeline ranks")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel replicas (processes = ranks x ep)")
    parser.add_argument("--microbatches", "-C", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-overlap", dest="overlap", action="store_false", help="run F&B pairs sequentially")
    parser.add_argument(
        "--engine", choices=["standalone", "deepspeed", "megatron"], default="standalone",
        help="standalone: the reference MoE model on this package's runtime (with the report); deepspeed / "
             "megatron: that framework's example (dualpipe_plugin.examples), in CPU mode",
    )
    parser.add_argument("--runs-dir", default="runs", help="where runs/<time>/ is created")
    parser.add_argument("--simulate", action="store_true", help="only show the simulated schedule (no training)")
    parser.add_argument("--cost", default="F=1,B=2,W=1,FB=3", help="costs for --simulate")


def _simulated_view(args: argparse.Namespace, out: Path) -> int:
    costs = CostModel.parse(args.cost)
    schedule = build_schedule(args.schedule, args.ranks, args.microbatches)
    result = simulate_finite(schedule, scale_costs(costs, args.ranks / schedule.placement.num_stages), drawn=True)
    make_output_dir(out, "--runs-dir", args.runs_dir)
    title = f"{schedule.name}  P={schedule.num_ranks}  C={schedule.num_microbatches}  ({args.cost})"
    png = write_timeline_png(result.timed_rows(), out / "timeline.png", title)
    trace = write_chrome_trace(result.timed_rows(), out / "trace.json", title)
    print(f"{title}\n\n{schedule.to_text()}")
    print(f"\nsimulated makespan {result.makespan:g}, bubble {result.bubble:g}, "
          f"peak activations per rank {list(result.peak_activations_per_rank)}")
    print(f"\nthe same model on {args.ranks} ranks (--cost is per 1/{args.ranks} of the model; a chunk of a V "
          f"chunk is half that):")
    for name in schedule_names():
        try:
            other_schedule = build_schedule(name, args.ranks, args.microbatches)
        except ValueError as error:
            print(f"  {name:10s} n/a ({str(error).split(';')[0]})")
            continue
        stages = other_schedule.placement.num_stages
        other = simulate_finite(other_schedule, scale_costs(costs, args.ranks / stages))
        print(f"  {name:10s} {stages:2d} stages  makespan {other.makespan:7g}  bubble {other.bubble:6g}  "
              f"peak activations {max(other.peak_activations_per_rank)} chunks of 1/{stages} of the model")
    print(f"\nwrote {png} and {trace} (open the trace in chrome://tracing or ui.perfetto.dev)")
    return 0


def _training_run(args: argparse.Namespace, out: Path) -> int:
    from dualpipe_plugin.demo.report import bubble_table, format_table, write_run_files
    from dualpipe_plugin.demo.train import DemoConfig, train_rank
    from dualpipe_plugin.launch import run_local

    config = DemoConfig(schedule=args.schedule, ranks=args.ranks, ep=args.ep, microbatches=args.microbatches,
                        steps=args.steps, overlap=args.overlap)
    schedule = build_schedule(config.schedule, config.ranks, config.microbatches)  # bad sizes fail here
    config.moe().local_experts(config.ep)
    if config.blocks < schedule.placement.num_stages:
        raise ValueError(f"the demo model has {config.blocks} blocks, fewer than the {schedule.placement.num_stages} "
                         f"stages of {schedule.name} on {config.ranks} ranks; use fewer ranks")
    make_output_dir(out, "--runs-dir", args.runs_dir)
    print(f"training the reference MoE transformer ({config.blocks} blocks, {config.experts} experts, top-{config.top_k}) "
          f"with {schedule.name} on {config.ranks} pipeline ranks x {config.ep} expert-parallel = {config.world} "
          f"CPU processes, {config.microbatches} micro-batches per step, overlap {'on' if config.overlap else 'off'}")
    results = run_local(train_rank, config.world, (config,), timeout_s=900)
    pipeline = sorted((r for r in results if r["replica"] == 0), key=lambda r: r["pipeline_rank"])
    losses = results[0]["losses"]
    files = write_run_files(out, schedule, [r["timeline"] for r in pipeline], losses)
    step_ms = sorted(results[0]["step_ms"][1:])
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; "
          f"median step {step_ms[len(step_ms) // 2]:.0f} ms")
    print("\nlast step, per rank (simulated from the measured op times):")
    print(format_table(bubble_table(schedule, [r["timeline"] for r in pipeline], [r["peak"] for r in pipeline])))
    print("  (real math: when there are more ranks than cores they take turns, which the measured bubble shows;\n"
          "   `dualpipe-plugin bench` times schedules on the emulated device instead)")
    print(f"\nwrote {files['timeline']}, {files['trace']} and {files['loss_curve']}")
    return 0


def run(args: argparse.Namespace) -> int:
    check_steps(args.steps)
    check_size(args.ranks, args.microbatches)
    out = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    if args.simulate:
        return _simulated_view(args, out)
    if args.engine != "standalone":
        from dualpipe_plugin.demo.engines import run_engine_demo

        build_schedule(args.schedule, args.ranks, args.microbatches)  # bad sizes fail here, with one line
        return run_engine_demo(args.engine, args.schedule, args.ranks, args.microbatches, args.steps)
    return _training_run(args, out)
