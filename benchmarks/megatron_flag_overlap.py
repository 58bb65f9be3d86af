"""Megatron-Core MoE all-to-all overlap switched on through the schedule function: whole steps, on vs off.

What a Megatron user gets from the flag, same model, same data, CPU/gloo.

Four processes, EP=2 x PP=2 (data parallel 2 for the dense part), Megatron-Core in CPU mode. Each builds
the reference GPT (Megatron's local MoE ``TransformerLayer`` s, alltoall dispatcher, ``--experts``
experts, top-``--topk``; ``--layers-per-stage`` layers in each of dualpipev's 4 stages) twice:
``configure_model_config(config, "dualpipev")`` and ``configure_model_config(config, "dualpipev",
overlap=True)`` (Megatron-LM: ``--pipeline-schedule dualpipev`` without / with
``--overlap-moe-expert-parallel-comm``), each wrapped in Megatron's DDP with ``finalize_model_grads``.
A step is one call of the plugin's ``get_forward_backward_func()`` (all micro-batches' forward and
backward, the gradient reduction, ``finalize_model_grads``; no optimizer), timed as the first process's
start to the last one's end. After ``--warmup`` rounds, ``--rounds`` rounds each run an off step then an
on step on the round's data. ``ratio`` = median(on) / median(off); ``paired_ratio_median`` = the median
over rounds of on / off (robust to load drifting on a shared box). ``losses_equal`` / ``grads_equal``:
every round's reported loss, and every gradient of the last round, bit-identical on and off.
``alltoalls_hidden`` / ``alltoalls_traced``: in one extra traced overlapped step, the dispatch/combine
transfers during which the other side of the F&B pair computed (0 of 0 would mean the overlap never ran).
Real math (fp32 CPU kernels) and real gloo transfers, but four processes share this box's cores: the
compute of one process can only hide a transfer when a core is free, so this is what the flag gives on
CPU, not a GPU prediction.

    .venv/bin/python benchmarks/megatron_flag_overlap.py                 # prints JSON
    .venv/bin/python benchmarks/megatron_flag_overlap.py --rounds 2      # quick check
    .venv/bin/python benchmarks/megatron_flag_overlap.py --out benchmarks/results/megatron_flag_overlap.json

It is a benchmark, not a test: timings depend on the machine, so no unit test asserts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualpipe_plugin.bench.megatron_flag_overlap import FlagOverlapConfig, run_flag_overlap_rank  # noqa: E402


def _versions() -> dict:
    import torch

    try:
        from importlib.metadata import version

        megatron = version("megatron-core")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        import megatron.core

        megatron = getattr(megatron.core, "__version__", "unknown")
    return {"torch": torch.__version__, "megatron_core": megatron}


def run(config: FlagOverlapConfig) -> dict:
    from dualpipe_plugin.bench.machine import machine_facts
    from dualpipe_plugin.bench.spans import step_times_ms
    from dualpipe_plugin.launch import run_local

    before = machine_facts()
    per_rank = run_local(run_flag_overlap_rank, config.world, args=(config,),
                         timeout_s=300 + 60 * (config.rounds + config.warmup))
    after = machine_facts()
    off = step_times_ms([r["spans"]["off"] for r in per_rank])
    on = step_times_ms([r["spans"]["on"] for r in per_rank])
    last = [r for r in per_rank if r["is_last_stage"]]
    losses_equal = all(r["losses"]["off"] == r["losses"]["on"] for r in last)
    # Dense parameters: one data-parallel replica's; experts: split over EP, each held by world/(pp*ep) ranks.
    dense = sum(r["params"] - r["expert_params"] for r in per_rank if r["dp_rank"] == 0)
    expert_params = sum(r["expert_params"] for r in per_rank) // (config.world // (config.pp * config.ep))
    r2 = lambda x: round(x, 2)  # noqa: E731
    return {
        "benchmark": "megatron_flag_overlap",
        "what": "dualpipev via get_forward_backward_func, configure_model_config(overlap=True) vs overlap off; "
                "EP=2 x PP=2, Megatron MoE TransformerLayers (alltoall dispatcher), gloo/CPU",
        "off_ms": r2(statistics.median(off)),
        "on_ms": r2(statistics.median(on)),
        "ratio": round(statistics.median(on) / statistics.median(off), 4),
        "paired_ratio_median": round(statistics.median(b / a for a, b in zip(off, on)), 4),
        "losses_equal": losses_equal,
        "grads_equal": all(r["grads_equal"] for r in per_rank),
        "losses": last[0]["losses"]["off"],
        "overlap_engine": {"off": any(r["overlap_engine"]["off"] for r in per_rank),
                           "on": all(r["overlap_engine"]["on"] for r in per_rank)},
        "alltoalls_traced": sum(r["alltoalls_traced"] for r in per_rank),
        "alltoalls_hidden": sum(r["alltoalls_hidden"] for r in per_rank),
        "off_samples_ms": [r2(t) for t in off],
        "on_samples_ms": [r2(t) for t in on],
        "config": asdict(config),
        "model": {
            "layers": config.num_layers,
            "stages": 2 * config.pp,
            "tokens_per_microbatch": config.seq * config.batch,
            "microbatches_per_dp_rank": config.microbatches,
            "data_parallel": config.world // config.pp,
            "params": dense + expert_params,
            "expert_params": expert_params,
            "params_per_rank": [r["params"] for r in per_rank],
        },
        "versions": _versions(),
        "machine": after,
        "load_average_before": before["load_average_1m_5m_15m"],
        "load_average_after": after["load_average_1m_5m_15m"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = FlagOverlapConfig()
    names = [f.name for f in fields(FlagOverlapConfig) if f.name not in ("pp", "ep")]
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=getattr(defaults, name))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    config = FlagOverlapConfig(**{name: getattr(args, name) for name in names})
    report = run(config)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
