"""A small GPT trained with DeepSpeed pipeline parallelism on a DualPipe schedule: a script to copy.

One GPU per process; P pipeline stages; the processes beyond P are data-parallel replicas (dp = world / P).
The schedule is the config's ``"pipeline": {"schedule": "dualpipev"}`` (or dualpipe, 1f1b, zb1p, deepspeed)::

    torchrun --nproc-per-node 8 launch/train_deepspeed.py --deepspeed_config configs/deepspeed/dualpipev.json \
        --pipeline-stages 4 --steps 200
    deepspeed --num_gpus 8 launch/train_deepspeed.py --deepspeed_config ... --pipeline-stages 4
    launch/torchrun_local.sh 4 launch/train_deepspeed.py --cpu --deepspeed_config ... --steps 2   # CPU, gloo

This file is the program's door from a clone of the repository: the program is the package module
:mod:`dualpipe_plugin.examples.deepspeed_gpt` (``python -m dualpipe_plugin.examples.deepspeed_gpt`` takes
the same arguments), whose docstring and modules say what it trains and how: the model
(``model.py``), the generated corpus (``data.py``), the command line and the config's checks (``job.py``)
and the loop (``train.py``).

``--preflight N`` checks the arguments and the config for a job of N processes in this one process and
exits (0 and an ``ok`` line, or 2 and one ``error:`` line); the launch scripts run it before they start
any rank, so a wrong path or a schedule the rank count cannot run fails in a second, without a traceback.
"""

from __future__ import annotations

# launch/common.sh and launch/slurm/megatron.sbatch look for the text "--preflight" in the script they run
# to know that it takes --preflight WORLD_SIZE (this one does, through its package module).

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dualpipe_plugin.examples.deepspeed_gpt.job import (  # noqa: E402
    PROG,
    UsageError,
    check_job,
    cpu_config,
    env_from_slurm,
    parse_args,
    read_config,
)
from dualpipe_plugin.examples.deepspeed_gpt.train import main, train  # noqa: E402

__all__ = ["PROG", "UsageError", "check_job", "cpu_config", "env_from_slurm", "main", "parse_args", "read_config",
           "train"]

if __name__ == "__main__":
    sys.exit(main())
