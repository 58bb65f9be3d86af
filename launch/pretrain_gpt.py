#!/usr/bin/env python
"""GPT pretraining on Megatron-Core with the pipeline schedule as one flag: ``--pipeline-schedule``.

GPU (one process per GPU; NCCL)::

    torchrun --nproc-per-node 8 launch/pretrain_gpt.py \\
        --num-layers 16 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 \\
        --micro-batch-size 2 --global-batch-size 64 --pipeline-model-parallel-size 4 \\
        --pipeline-schedule dualpipev --lr 3e-4 --train-iters 1000 --log-interval 10 --bf16 \\
        --use-distributed-optimizer --save ckpt --save-interval 500

CPU (laptops, CI; gloo and :func:`dualpipe_plugin.megatron.enable_cpu_mode`), spawning the ranks itself::

    python launch/pretrain_gpt.py --cpu --nproc 2 --num-layers 4 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 32 --micro-batch-size 2 --global-batch-size 8 --pipeline-model-parallel-size 2 \\
        --pipeline-schedule dualpipev --train-iters 20 --log-interval 5

``--preflight WORLD_SIZE`` only checks the arguments for that many ranks (no torch, no Megatron) and exits:
0 and one summary line, or 2 and one ``error:`` line; the launch scripts run it before any rank starts.

This file is the program's door from a clone of the repository: the program is the package module
:mod:`dualpipe_plugin.examples.megatron_gpt` (``python -m dualpipe_plugin.examples.megatron_gpt`` takes the
same arguments), whose docstring says what it trains and how; its model is the reference tiny GPT of
:mod:`dualpipe_plugin.reference.megatron_gpt`.
"""

from __future__ import annotations

# launch/common.sh and launch/slurm/megatron.sbatch look for the text "--preflight" in the script they run
# to know that it takes --preflight WORLD_SIZE (this one does, through its package module).

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dualpipe_plugin.examples.megatron_gpt.arguments import build_parser, parse_args, validate_args  # noqa: E402
from dualpipe_plugin.examples.megatron_gpt.train import TrainResult, command_line, main, train  # noqa: E402

__all__ = ["TrainResult", "build_parser", "command_line", "main", "parse_args", "train", "validate_args"]

if __name__ == "__main__":
    sys.exit(command_line())
