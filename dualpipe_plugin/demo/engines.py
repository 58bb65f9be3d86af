"""The demo through DeepSpeed or Megatron-Core: the package's framework examples in CPU mode.

``dualpipe-plugin demo --engine deepspeed`` runs :mod:`dualpipe_plugin.examples.deepspeed_gpt` (a small
GPT as a DeepSpeed PipelineModule, schedule from the JSON config) under torchrun; ``--engine megatron``
runs :mod:`dualpipe_plugin.examples.megatron_gpt` (the reference GPT on Megatron-Core,
``--pipeline-schedule``), which spawns its own CPU ranks. Both are run as modules of the installed package
(``launch/train_deepspeed.py`` and ``launch/pretrain_gpt.py`` are the same programs in a clone) and print
their own per-step losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["run_engine_demo"]


def _deepspeed_config(schedule: str, microbatches: int, steps: int) -> dict:
    """The optimizer, clipping and ZeRO settings of ``configs/deepspeed/dualpipev.json``, with the demo's
    schedule (overlap off: the example's blocks are plain torch layers) and micro-batch count."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": microbatches,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "pipeline": {"schedule": schedule, "overlap": False},
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 1.0,
        "steps_per_print": max(steps, 1),
    }


def _deepspeed_command(schedule: str, ranks: int, microbatches: int, steps: int, workdir: Path) -> list[str]:
    path = workdir / "deepspeed_demo.json"
    path.write_text(json.dumps(_deepspeed_config(schedule, microbatches, steps), indent=2))
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone",
        "-m", "dualpipe_plugin.examples.deepspeed_gpt", "--cpu", "--deepspeed_config", str(path),
        "--steps", str(steps), "--pipeline-stages", str(ranks), "--log-interval", "5",
    ]


def _megatron_command(schedule: str, ranks: int, microbatches: int, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "dualpipe_plugin.examples.megatron_gpt", "--cpu", "--nproc", str(ranks),
        "--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", str(2 * microbatches),
        "--pipeline-model-parallel-size", str(ranks), "--pipeline-schedule", schedule,
        "--train-iters", str(steps), "--log-interval", "5", "--lr", "3e-3",
    ]


def run_engine_demo(engine: str, schedule: str, ranks: int, microbatches: int, steps: int) -> int:
    """Run the engine's example; return its exit status (its output goes to this terminal)."""
    with tempfile.TemporaryDirectory() as workdir:
        if engine == "deepspeed":
            command = _deepspeed_command(schedule, ranks, microbatches, steps, Path(workdir))
        elif engine == "megatron":
            command = _megatron_command(schedule, ranks, microbatches, steps)
        else:
            raise ValueError(f"unknown engine {engine!r}; choose standalone, deepspeed or megatron")
        print(f"$ {' '.join(command)}", flush=True)
        return subprocess.run(command).returncode
