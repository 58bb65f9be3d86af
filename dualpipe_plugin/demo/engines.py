"""The demo through DeepSpeed or Megatron-Core: the repository's own training scripts in CPU mode.

``dualpipe-plugin demo --engine deepspeed`` runs ``launch/train_deepspeed.py`` (a small GPT as a
DeepSpeed PipelineModule, schedule from the JSON config) under torchrun; ``--engine megatron`` runs
``launch/pretrain_gpt.py`` (a small GPTModel on Megatron-Core, ``--pipeline-schedule``), which spawns its
own CPU ranks. Both print their own per-step losses; these scripts are what users copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["run_engine_demo"]

_ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> Path:
    path = _ROOT / "launch" / name
    if not path.exists():
        raise ValueError(
            f"the {name} example lives in the repository's launch/ folder, not in the installed package; "
            f"run the demo from a clone of the repository"
        )
    return path


def _deepspeed_command(schedule: str, ranks: int, microbatches: int, steps: int, workdir: Path) -> list[str]:
    config = json.loads((_ROOT / "configs" / "deepspeed" / "dualpipev.json").read_text())
    config["gradient_accumulation_steps"] = microbatches
    config["pipeline"] = {"schedule": schedule, "overlap": False}
    config["steps_per_print"] = max(steps, 1)
    path = workdir / "deepspeed_demo.json"
    path.write_text(json.dumps(config, indent=2))
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone",
        str(_script("train_deepspeed.py")), "--cpu", "--deepspeed_config", str(path), "--steps", str(steps),
        "--pipeline-stages", str(ranks), "--log-interval", "5",
    ]


def _megatron_command(schedule: str, ranks: int, microbatches: int, steps: int) -> list[str]:
    return [
        sys.executable, str(_script("pretrain_gpt.py")), "--cpu", "--nproc", str(ranks),
        "--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", str(2 * microbatches),
        "--pipeline-model-parallel-size", str(ranks), "--pipeline-schedule", schedule,
        "--train-iters", str(steps), "--log-interval", "5", "--lr", "3e-3",
    ]


def run_engine_demo(engine: str, schedule: str, ranks: int, microbatches: int, steps: int) -> int:
    """Run the engine's example script; return its exit status (its output goes to this terminal)."""
    with tempfile.TemporaryDirectory() as workdir:
        if engine == "deepspeed":
            command = _deepspeed_command(schedule, ranks, microbatches, steps, Path(workdir))
        elif engine == "megatron":
            command = _megatron_command(schedule, ranks, microbatches, steps)
        else:
            raise ValueError(f"unknown engine {engine!r}; choose standalone, deepspeed or megatron")
        print(f"$ {' '.join(command)}", flush=True)
        return subprocess.run(command, cwd=_ROOT).returncode
