"""Run Megatron-LM's own ``pretrain()`` (megatron-core >= 0.19's wheel) on CPU/gloo, the way a user would.

One job = ``torchrun -m dualpipe_plugin.megatron.run_megatron_lm --cpu`` on
:mod:`dualpipe_plugin.examples.megatron_lm_gpt` (a script shaped like Megatron-LM's ``pretrain_gpt.py``)
with ordinary Megatron-LM arguments for a tiny GPT, plus the job's own. Every rank that computes a loss
writes its per-micro-batch losses (exact, ``float.hex``). Which rank computes which micro-batch depends on
the schedule (1F1B: the last pipeline rank; a V: rank 0; DualPipe: rank P-1 the first half, rank 0 the
second), so :func:`run_job` returns them as blocks: one per (phase, iteration), every rank's losses of it
together, as a sorted list.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dualpipe_plugin.launch import free_port

TINY_GPT = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--train-iters 2 --eval-iters 1 --eval-interval 2 --log-interval 1 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 1 --clip-grad 1.0 --weight-decay 0.01 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --split 98,1,1 "
    "--transformer-impl local --use-cpu-initialization --distributed-backend gloo "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion "
    "--no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion "
    "--attention-dropout 0.0 --hidden-dropout 0.0 --seed 1234 --num-workers 0 --layout-independent-init"
).split()
"""Megatron-LM's own flags for a tiny GPT on CPU: mock data, no Transformer Engine, fusions off, dropout
off, every weight drawn by its global name so every layout starts from the same model."""

MOE = ("--num-experts 4 --expert-model-parallel-size 2 --moe-router-topk 2 --moe-token-dispatcher-type alltoall "
       "--moe-aux-loss-coeff 1e-2").split()


@dataclass
class JobResult:
    returncode: int
    blocks: list[tuple[str, list[float]]] = field(default_factory=list)
    """(phase, sorted losses) per training step or evaluation, in order."""
    output: str = ""

    def train(self) -> list[list[float]]:
        """The losses of every training step (sorted within a step)."""
        return [losses for phase, losses in self.blocks if phase == "train"]


def _blocks(per_rank: list[list[tuple[str, int, float]]]) -> list[tuple[str, list[float]]]:
    """(phase, iteration) blocks in the order they first appear; within a block, sorted losses."""
    blocks: dict[tuple[str, int], list[float]] = {}
    for losses in per_rank:
        for phase, iteration, loss in losses:
            blocks.setdefault((phase, iteration), []).append(loss)
    return [(phase, sorted(losses)) for (phase, _), losses in blocks.items()]


def script() -> str:
    import dualpipe_plugin.examples as examples

    return str(Path(examples.__file__).with_name("megatron_lm_gpt.py"))


def run_job(workdir: Path, name: str, nproc: int, args: list[str], *, timeout_s: float = 420,
            script_path: str | None = None, runner: bool = True) -> JobResult:
    """Run one job; ``runner=False`` runs the script directly (to test a patch placed by the script)."""
    dump = workdir / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DUALPIPE_LOSS_DUMP": str(dump),
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port())]
    target = script_path or script()
    program = ["-m", "dualpipe_plugin.megatron.run_megatron_lm", "--cpu", target] if runner else [target]
    try:
        done = subprocess.run(launcher + program + TINY_GPT + list(args), env=env, capture_output=True, text=True,
                              timeout=timeout_s, cwd=workdir)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        return JobResult(-9, [], output)
    per_rank = [[(phase, iteration, float.fromhex(value))
                 for phase, iteration, value in json.loads(Path(path).read_text())]
                for path in sorted(glob.glob(f"{dump}.rank*.json"))]
    return JobResult(code, _blocks(per_rank), output)


def max_relative_difference(a: JobResult, b: JobResult) -> float:
    assert [(phase, len(v)) for phase, v in a.blocks] == [(phase, len(v)) for phase, v in b.blocks], \
        "different steps or micro-batch counts"
    assert a.blocks, "no losses recorded"
    return max(abs(x - y) / abs(y) for (_, xs), (_, ys) in zip(a.blocks, b.blocks) for x, y in zip(xs, ys))
