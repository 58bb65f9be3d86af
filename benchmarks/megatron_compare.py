"""Our dualpipev inside Megatron-Core vs Megatron's own 1F1B and interleaved schedules (emulated device).

All schedules run in ONE invocation on the same 4 processes (gloo, CPU, Megatron-Core 0.16.1 in
:func:`dualpipe_plugin.megatron.enable_cpu_mode`) and the same emulated model, steps interleaved
(ours, Megatron 1F1B, Megatron interleaved, ...), so machine load hits them alike; the figure is the
median of the per-round ratios to Megatron's 1F1B::

    .venv/bin/python benchmarks/megatron_compare.py                     # P=4, C=16, 8 layers, 10 rounds
    .venv/bin/python benchmarks/megatron_compare.py --rounds 3 --out /tmp/quick.json

The model is 8 emulated layers (``EmulatedLayer``: Linear(64) + tanh whose forward, input-gradient and
weight-gradient parts last F=10, I=10, W=10 ms each, so B=20 ms) inside a minimal Megatron module
(``EmulatedMegatronChunk`` of :mod:`dualpipe_plugin.bench.megatron_chunk`: ``config``, ``set_input_tensor``,
``pre_process``/``post_process``), with Megatron's loss-function convention in ``forward_step``.
Megatron 1F1B: 4 stages of 2 layers; Megatron interleaved (VP=2): 8 stages of 1 layer, stage vp*4 + r;
ours: 8 stages of 1 layer in a V, built by ``build_model_chunks`` after ``configure_model_config(config,
"dualpipev")``. Each step is one call of the schedule's forward-backward function with
``forward_step_func``, ``data_iterator``, ``model``, ``num_microbatches`` — what Megatron-LM's
``train_step`` does. The ideal step (no bubble) is 16 x 8 x 30 ms / 4 = 960 ms; ``simulated_ms`` is the
simulator's figure for our schedules with the same costs (1f1b also predicts Megatron's 1F1B).
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
ENGINES = ("dualpipe_plugin_dualpipev", "dualpipe_plugin_zb1p", "megatron_1f1b", "megatron_interleaved")


def _rank(rank: int, world_size: int, settings: dict) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import TransformerConfig

    from dualpipe_plugin.bench.megatron_chunk import emulated_megatron_chunk_class
    from dualpipe_plugin.megatron import build_model_chunks, configure_model_config, enable_cpu_mode
    from dualpipe_plugin.megatron.schedule_fn import PipelineScheduleFunction
    from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer

    costs = EmulatedCosts(settings["F"] / 1e3, (settings["B"] - settings["W"]) / 1e3, settings["W"] / 1e3)
    dim, seq, layers, pp, mbs = settings["dim"], settings["seq"], settings["layers"], world_size, 1
    microbatches = settings["micro_batches"]

    chunk_class = emulated_megatron_chunk_class()

    def chunk(config, pre_process, post_process, num_layers):
        emulated = [EmulatedLayer(dim, costs) for _ in range(num_layers)]
        return chunk_class(config, emulated, pre_process=pre_process, post_process=post_process)

    def config_for(vp=None):
        return TransformerConfig(num_layers=layers, hidden_size=dim, num_attention_heads=1,
                                 pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                                 pipeline_dtype=torch.float32, batch_p2p_comm=False, use_cpu_initialization=True)

    def loss_func(output):
        loss = output.sum()
        tokens = torch.tensor(output.numel(), dtype=torch.int)
        return loss, tokens, {"loss": torch.stack([loss.detach(), tokens.float()])}

    def forward_step(data_iterator, model):
        x = next(data_iterator) if model.pre_process else None
        output = model(x)
        return (output.pow(2).mean(dim=-1) if model.post_process else output), loss_func  # [seq, mbs] "loss"

    def data():
        gen = torch.Generator().manual_seed(0)
        return iter([torch.randn(seq, mbs, dim, generator=gen) for _ in range(microbatches)])

    with enable_cpu_mode():
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp)
        r = parallel_state.get_pipeline_model_parallel_rank()
        torch.manual_seed(0)
        engines = {}
        # Megatron 1F1B: stage r = layers 2r, 2r+1.
        config = config_for()
        engines["megatron_1f1b"] = (
            schedules.forward_backward_pipelining_without_interleaving,
            [chunk(config, r == 0, r == pp - 1, layers // pp)],
        )
        # Megatron interleaved: chunk i = stage i*P + r (one layer each).
        config = config_for(vp=2)
        engines["megatron_interleaved"] = (
            schedules.forward_backward_pipelining_with_interleaving,
            [chunk(config, r == 0 and i == 0, r == pp - 1 and i == 1, layers // (2 * pp)) for i in range(2)],
        )
        for name, schedule in (("dualpipe_plugin_dualpipev", "dualpipev"), ("dualpipe_plugin_zb1p", "zb1p")):
            config = configure_model_config(config_for(), schedule)
            per_stage = layers // (2 * pp) if schedule == "dualpipev" else layers // pp
            model = build_model_chunks(
                lambda pre_process, post_process, vp_stage, c=config, n=per_stage: chunk(c, pre_process,
                                                                                       post_process, n),
                config,
            )
            engines[name] = (PipelineScheduleFunction(schedule), model)

        times = {name: [] for name in ENGINES}
        for round_index in range(settings["warmup"] + settings["rounds"]):
            for name in ENGINES:
                function, model = engines[name]
                iterators = [data() for _ in model]
                dist.barrier()
                start = time.perf_counter()
                function(forward_step_func=forward_step,
                         data_iterator=iterators if len(model) > 1 else iterators[0],
                         model=model if len(model) > 1 else model[0], num_microbatches=microbatches,
                         seq_length=seq, micro_batch_size=mbs, forward_only=False)
                end = time.perf_counter()
                span = torch.tensor([start, end], dtype=torch.float64)
                spans = [torch.zeros(2, dtype=torch.float64) for _ in range(world_size)]
                dist.all_gather(spans, span)
                if round_index >= settings["warmup"]:
                    times[name].append((max(s[1].item() for s in spans) - min(s[0].item() for s in spans)) * 1e3)
        parallel_state.destroy_model_parallel()
    return times


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, ROOT)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "megatron_compare.json"))
    args = parser.parse_args(argv)
    settings = dict(F=10.0, B=20.0, W=10.0, dim=64, seq=8, layers=8, micro_batches=16, rounds=args.rounds,
                    warmup=args.warmup)

    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

    per_rank = run_local(_rank, 4, args=(settings,), timeout_s=600 + 20 * args.rounds)
    times = per_rank[0]
    reference = "megatron_1f1b"
    ratios = {name: round(statistics.median(t / ref for t, ref in zip(times[name], times[reference])), 3)
              for name in ENGINES}
    per_chunk = {"dualpipe_plugin_dualpipev": 1, "dualpipe_plugin_zb1p": 2}
    simulated = {
        name: simulate(build_schedule(schedule, 4, 16),
                       CostModel(F=settings["F"] * per_chunk[name], B=settings["B"] * per_chunk[name],
                                 W=settings["W"] * per_chunk[name])).makespan
        for name, schedule in (("dualpipe_plugin_dualpipev", "dualpipev"), ("dualpipe_plugin_zb1p", "zb1p"))
    }
    two_layers = CostModel(F=2 * settings["F"], B=2 * settings["B"], W=2 * settings["W"])
    simulated["megatron_1f1b"] = simulate(build_schedule("1f1b", 4, 16), two_layers).makespan
    result = {
        "what": "forward-backward step time on the emulated device, Megatron-Core 0.16.1, schedules "
                "interleaved in one run",
        "ranks": 4,
        "micro_batches": 16,
        "layers": 8,
        "per_layer_ms": {"F": settings["F"], "B": settings["B"], "W": settings["W"]},
        "ideal_ms": 16 * 8 * (settings["F"] + settings["B"]) / 4,
        "rounds": args.rounds,
        "median_ms": {name: round(statistics.median(times[name]), 1) for name in ENGINES},
        "paired_ratio_to_megatron_1f1b": ratios,
        "simulated_ms": simulated,
        "times_ms": {name: [round(t, 1) for t in times[name]] for name in ENGINES},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
                    "date": datetime.date.today().isoformat()},
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps({k: result[k] for k in ("median_ms", "paired_ratio_to_megatron_1f1b", "simulated_ms")}, indent=2))
    return result


if __name__ == "__main__":
    main()
