"""Our dualpipev inside DeepSpeed vs DeepSpeed's TrainSchedule vs DeepSpeed's own DualPipeVEngine.

All three run in ONE invocation on the same 4 processes (gloo, CPU) and the same emulated device, steps
interleaved (ours, TrainSchedule, DeepSpeed's DualPipeV, ours, ...), so machine load hits them alike; the
figure is the median of the per-round ratios to TrainSchedule::

    .venv/bin/python benchmarks/deepspeed_compare.py                     # P=4, C=16, 8 layers, 10 rounds
    .venv/bin/python benchmarks/deepspeed_compare.py --rounds 3 --out /tmp/quick.json

The model is 8 ``LayerSpec(EmulatedLayer, dim, costs)`` (Linear + tanh whose forward, input-gradient and
weight-gradient parts last F=10, I=10, W=10 ms each, so B=20 ms), partitioned by DeepSpeed: 4 stages of 2
layers for TrainSchedule, 8 stages of 1 layer (2 per rank) for both V engines. Every engine is built by
``deepspeed.initialize``; ours by ``"pipeline": {"schedule": "dualpipev"}``, DeepSpeed's DualPipeV by
``DualPipeVModule``. The ideal step (no bubble) is 16 x 8 x 30 ms / 4 = 960 ms; ``simulated_ms`` is the
simulator's figure for our schedule with the same costs.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("dualpipe_plugin_dualpipev", "deepspeed_train_schedule", "deepspeed_dualpipev")


def _rank(rank: int, world_size: int, settings: dict) -> dict:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 20 s JIT build of an unused op
    import deepspeed
    import torch
    import torch.nn.functional as F
    from deepspeed import comm as dist
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.dualpipev import DualPipeVModule

    import dualpipe_plugin.deepspeed as plugin
    from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer

    deepspeed.init_distributed(dist_backend="gloo")
    costs = EmulatedCosts(settings["F"] / 1e3, (settings["B"] - settings["W"]) / 1e3, settings["W"] / 1e3)
    dim, mbs, gas = settings["dim"], settings["micro_batch_size"], settings["micro_batches"]
    specs = [LayerSpec(EmulatedLayer, dim, costs) for _ in range(settings["layers"])]

    def loss_fn(outputs, labels):
        return F.mse_loss(outputs, labels)

    def config(schedule: str | None) -> dict:
        cfg = {
            "train_micro_batch_size_per_gpu": mbs,
            "gradient_accumulation_steps": gas,
            "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
            "steps_per_print": 10**9,
        }
        if schedule is not None:
            cfg["pipeline"] = {"schedule": schedule}
        return cfg

    def build(kind: str):
        torch.manual_seed(0)
        ours = kind == "dualpipe_plugin_dualpipev"
        (plugin.register if ours else plugin.unregister)()  # before the module: it records its partition method
        if kind == "deepspeed_dualpipev":
            model = DualPipeVModule(layers=specs, num_stages=world_size, loss_fn=loss_fn, partition_method="uniform")
        else:
            model = PipelineModule(layers=specs, num_stages=world_size, loss_fn=loss_fn, partition_method="uniform")
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=config("dualpipev" if ours else None))
        return engine

    engines = {kind: build(kind) for kind in ENGINES}
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(mbs, dim, generator=generator), torch.randn(mbs, dim, generator=generator))
               for _ in range(gas)]

    def step(kind: str) -> float:
        dist.barrier()
        start = time.perf_counter()
        engines[kind].train_batch(iter(batches))
        dist.barrier()  # a step ends when its slowest rank ends
        return (time.perf_counter() - start) * 1e3

    for _ in range(settings["warmup"]):
        for kind in ENGINES:
            step(kind)
    times: dict[str, list[float]] = {kind: [] for kind in ENGINES}
    for _ in range(settings["rounds"]):
        for kind in ENGINES:
            times[kind].append(step(kind))
    return {"times_ms": times, "engine_classes": {k: type(e).__name__ for k, e in engines.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "deepspeed_compare.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

    settings = {"F": 10.0, "B": 20.0, "W": 10.0, "dim": 64, "micro_batch_size": 4, "layers": args.layers,
                "micro_batches": args.microbatches, "rounds": args.rounds, "warmup": args.warmup}
    load_before = os.getloadavg()[0]
    results = run_local(_rank, args.ranks, args=(settings,), timeout_s=1800)
    times = results[0]["times_ms"]  # identical on every rank up to the barrier's skew; rank 0's clock
    layers_per_chunk = args.layers / (2 * args.ranks)
    chunk = CostModel(F=settings["F"] * layers_per_chunk, B=settings["B"] * layers_per_chunk,
                      W=settings["W"] * layers_per_chunk)
    simulated = simulate(build_schedule("dualpipev", args.ranks, args.microbatches), chunk).makespan
    baseline = times["deepspeed_train_schedule"]
    record = {
        "what": "train_batch step time on the emulated device, engines interleaved in one run",
        "ranks": args.ranks,
        "micro_batches": args.microbatches,
        "layers": args.layers,
        "per_layer_ms": {"F": settings["F"], "B": settings["B"], "W": settings["W"]},
        "ideal_ms": args.microbatches * args.layers * (settings["F"] + settings["B"]) / args.ranks,
        "rounds": args.rounds,
        "median_ms": {kind: round(statistics.median(t), 1) for kind, t in times.items()},
        "paired_ratio_to_train_schedule": {
            kind: round(statistics.median(a / b for a, b in zip(t, baseline)), 3) for kind, t in times.items()
        },
        "simulated_ms": {"dualpipe_plugin_dualpipev": round(simulated, 1)},
        "times_ms": {kind: [round(v, 1) for v in t] for kind, t in times.items()},
        "engine_classes": results[0]["engine_classes"],
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    print(json.dumps({k: record[k] for k in ("median_ms", "paired_ratio_to_train_schedule", "simulated_ms",
                                             "ideal_ms", "load_average_1min")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
