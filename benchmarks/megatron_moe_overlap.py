"""Megatron-Core MoE layers in an F&B pair: overlapped (the engine's rule) vs sequential, real math, CPU/gloo.

Two expert-parallel processes (EP=2, Megatron-Core in CPU mode), each holding two chunks of
``--layers`` Megatron MoE ``TransformerLayer`` s (local spec, alltoall dispatcher) built with
``megatron_staged_chunk``. Per repetition chunk b runs a forward (untimed), then the pair "F of a & B of b"
runs sequentially (``run_pair_sides(overlap=False)``: F then B, each all-to-all waited at once) or
overlapped; both modes alternate. No emulated compute: attention, router, experts and the dispatcher's
permutations are Megatron's own fp32 CPU kernels, and dispatch/combine are real gloo ``all_to_all_single``
transfers. ``ratio`` = overlapped / sequential (medians; a pair's time is the slower process's);
``paired_ratio_median`` = the median of each overlapped pair over the sequential one just before it;
``ideal_ratio`` = max(compute, comm) / sequential from the sequential pair's trace.

    .venv/bin/python benchmarks/megatron_moe_overlap.py                 # prints JSON
    .venv/bin/python benchmarks/megatron_moe_overlap.py --out benchmarks/results/megatron_moe_overlap.json

It is a benchmark, not a test: timings depend on the machine, so no unit test asserts them.
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
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Config:
    hidden: int = 256
    ffn: int = 512
    heads: int = 8
    experts: int = 8
    topk: int = 2
    seq: int = 256
    batch: int = 2
    layers: int = 2
    """MoE layers per chunk."""
    repeats: int = 15
    warmup: int = 3
    threads: int = 1
    """torch intra-op threads per process (2 processes share the cores)."""


def _split(trace) -> dict[str, float]:
    sums = {"compute": 0.0, "comm": 0.0, "weight": 0.0}
    for event in trace:
        sums[event.what] += event.end - event.start
    return sums


def _worker(rank: int, world: int, config: Config) -> dict:
    import torch
    import torch.distributed as dist

    from dualpipe_plugin.megatron import enable_cpu_mode
    from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk
    from dualpipe_plugin.runtime.overlap import Side, run_pair_sides
    from dualpipe_plugin.runtime.staged import claim_backward
    from dualpipe_plugin.reference.megatron_gpt import (
        Parallel, TinyGPT, destroy_parallel, init_parallel, model_provider, transformer_config,
    )
    from dualpipe_plugin.reference.megatron_names import init_for_comparison

    torch.set_num_threads(config.threads)
    tiny = TinyGPT(hidden_size=config.hidden, ffn_hidden_size=config.ffn, num_attention_heads=config.heads,
                   num_moe_experts=config.experts, moe_router_topk=config.topk, seq_length=config.seq,
                   micro_batch_size=config.batch, num_layers=2 * config.layers, share_embeddings=False)
    par = Parallel(ep=world)
    with enable_cpu_mode():
        init_parallel(par, tiny.seed)
        try:
            provider = model_provider(tiny, transformer_config(tiny, par), init=init_for_comparison)
            gpt = provider(False, False)  # the decoder layers only
            a = megatron_staged_chunk(gpt, layers=slice(0, config.layers))
            b = megatron_staged_chunk(gpt, layers=slice(config.layers, 2 * config.layers))
            gen = torch.Generator().manual_seed(rank)
            shape = (config.seq, config.batch, config.hidden)
            x_a, x_b, grad_b = (torch.randn(shape, generator=gen) for _ in range(3))

            def pair(overlap: bool, trace=None) -> float:
                leaf_a, leaf_b = x_a.clone().requires_grad_(True), x_b.clone().requires_grad_(True)
                out_b = b(leaf_b)
                dist.barrier()
                start = time.perf_counter()
                forward = Side("F", a, lambda: (a.begin((leaf_a,)), (leaf_a,)), lambda run, outs: None, trace=trace)
                backward = Side("B", b, lambda: claim_backward(b, [out_b], [grad_b]),
                                lambda run, grads: run.deposit_input_grads(grads), backward=True, trace=trace)
                run_pair_sides(forward, backward, overlap=overlap)
                elapsed = time.perf_counter() - start
                gpt.zero_grad(set_to_none=True)
                return elapsed

            for _ in range(config.warmup):
                pair(False), pair(True)
            times = {False: [], True: []}
            profiles = []
            for _ in range(config.repeats):
                for overlap in (False, True):
                    trace = [] if not overlap else None
                    times[overlap].append(pair(overlap, trace))
                    if trace is not None:
                        profiles.append(_split(trace))
            # A pair's time is the slower process's.
            table = torch.tensor([times[False], times[True]], dtype=torch.float64)
            dist.all_reduce(table, op=dist.ReduceOp.MAX)
            profile = torch.tensor([statistics.median(p[k] for p in profiles) for k in ("compute", "comm")],
                                   dtype=torch.float64)
            dist.all_reduce(profile)
            return {"sequential_s": table[0].tolist(), "overlapped_s": table[1].tolist(),
                    "compute_s": float(profile[0]) / world, "comm_s": float(profile[1]) / world}
        finally:
            destroy_parallel()


def run(config: Config) -> dict:
    from dualpipe_plugin.launch import run_local

    result = run_local(_worker, 2, args=(config,), timeout_s=600)[0]
    seq = statistics.median(result["sequential_s"])
    ovl = statistics.median(result["overlapped_s"])
    ms = lambda s: round(1000 * s, 2)  # noqa: E731
    return {
        "benchmark": "megatron_moe_overlap",
        "sequential_ms": ms(seq),
        "overlapped_ms": ms(ovl),
        "ratio": round(ovl / seq, 4),
        # Each overlapped pair over the sequential pair run just before it: robust to load drifting
        # over the run (the box is shared).
        "paired_ratio_median": round(statistics.median(
            o / s for s, o in zip(result["sequential_s"], result["overlapped_s"])), 4),
        "ideal_ratio": round(max(result["compute_s"], result["comm_s"]) / seq, 4),
        "compute_ms": ms(result["compute_s"]),
        "comm_ms": ms(result["comm_s"]),
        "comm_share": round(result["comm_s"] / seq, 4),
        "sequential_samples_ms": [ms(s) for s in result["sequential_s"]],
        "overlapped_samples_ms": [ms(s) for s in result["overlapped_s"]],
        "config": asdict(config),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "date": datetime.date.today().isoformat()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    for field in ("hidden", "ffn", "heads", "experts", "topk", "seq", "batch", "layers", "repeats", "warmup",
                  "threads"):
        parser.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    config = Config(**{k: v for k, v in vars(args).items() if k != "out"})
    report = run(config)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
