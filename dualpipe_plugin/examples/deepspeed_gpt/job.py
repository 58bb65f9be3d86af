"""The DeepSpeed example's command line and config: parsing, reading the JSON, and the checks that run
before any rank starts (each refusal a :class:`UsageError`: one line, exit status 2); the CPU variant of a
config; ranks from SLURM's variables under a bare ``srun``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["PROG", "UsageError", "parse_args", "read_config", "check_job", "env_from_slurm", "cpu_config"]

PROG = "train_deepspeed.py"
"""The name the example prints in its messages (that of ``launch/train_deepspeed.py``)."""


class UsageError(Exception):
    """A mistake in the command line or the config: printed as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A small GPT trained with DeepSpeed pipeline parallelism on a DualPipe schedule: a script to copy.",
    )
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                        metavar="PATH", help="DeepSpeed JSON config (its 'pipeline.schedule' picks the schedule)")
    parser.add_argument("--steps", type=int, default=100, help="train_batch calls (default 100)")
    parser.add_argument("--pipeline-stages", type=int, default=None, metavar="P",
                        help="pipeline ranks (PipelineModule num_stages); default: every process")
    parser.add_argument("--cpu", action="store_true",
                        help="run on CPU: DeepSpeed's CPU accelerator, gloo, no JIT-built ops (Adam/AdamW "
                             "run as torch_adam)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--partition-method", default="type:Block",
                        help="PipelineModule partition_method (default type:Block: blocks spread evenly)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-interval", type=int, default=10, help="log every N steps (and the last)")
    parser.add_argument("--save", metavar="DIR", help="save a checkpoint here at the end (and every --save-interval)")
    parser.add_argument("--save-interval", type=int, default=0, metavar="N")
    parser.add_argument("--load", metavar="DIR", help="resume from the latest checkpoint in DIR")
    parser.add_argument("--preflight", type=int, default=None, metavar="WORLD_SIZE",
                        help="only check arguments and config for WORLD_SIZE processes, then exit")
    # The deepspeed launcher appends --local_rank=N; torch.distributed reads LOCAL_RANK from the env anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "layers", "hidden", "heads", "seq_len", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    return args


def read_config(path: str) -> dict:
    config_path = Path(path)
    if not config_path.is_file():
        raise UsageError(f"DeepSpeed config {path!r} does not exist (--deepspeed_config)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"DeepSpeed config {path!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"DeepSpeed config {path!r} must hold a JSON object, got {type(config).__name__}")
    return config


def check_job(args, config: dict, world_size: int) -> tuple[int, int, str]:
    """(num_stages, micro_batches, schedule) for ``world_size`` processes; UsageError on what cannot run.

    The DualPipe engine checks all of this again at ``deepspeed.initialize``; here it is checked before
    any process starts, with the schedule layer's own messages.
    """
    from dualpipe_plugin.schedules import ScheduleConfigError, build_schedule, get_schedule, schedule_names

    stages = args.pipeline_stages or world_size
    if stages < 1 or world_size % stages:
        raise UsageError(f"--pipeline-stages {stages} must divide the {world_size} processes "
                         f"(the rest are data-parallel replicas)")
    dp = world_size // stages
    mbs = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    if gas is None:
        gas = total // (mbs * dp) if total and mbs else 1
    if total is not None and mbs is not None and total != mbs * gas * dp:
        raise UsageError(f"train_batch_size {total} != train_micro_batch_size_per_gpu {mbs} x "
                         f"gradient_accumulation_steps {gas} x {dp} data-parallel replicas; fix the config")
    pipeline = config.get("pipeline", {})
    schedule = str(pipeline.get("schedule", "deepspeed")).strip().lower() if isinstance(pipeline, dict) else ""
    if schedule != "deepspeed":
        if schedule not in schedule_names():
            raise UsageError(f"unknown pipeline.schedule {pipeline.get('schedule')!r} in {args.deepspeed_config}; "
                             f"valid: {', '.join([*schedule_names(), 'deepspeed'])}")
        try:
            build_schedule(schedule, stages, gas)
        except ScheduleConfigError as error:
            raise UsageError(f"pipeline.schedule {schedule!r} cannot run on {stages} pipeline stages with "
                             f"gradient_accumulation_steps={gas} (micro-batches per step): {error}") from None
    model_stages = stages if schedule == "deepspeed" else get_schedule(schedule).num_stages(stages)
    if args.partition_method.startswith("type:") and args.layers < model_stages:
        raise UsageError(f"--layers {args.layers} is fewer than the {model_stages} model stages of {schedule!r} "
                         f"on {stages} ranks; use --layers >= {model_stages}")
    return stages, gas, schedule


def env_from_slurm() -> None:
    """Under a bare ``srun python ...`` (no torchrun/deepspeed launcher), take the ranks from SLURM."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UsageError("under srun without torchrun set MASTER_ADDR and MASTER_PORT (see launch/slurm/*.sbatch)")


def cpu_config(config: dict) -> dict:
    """The config for --cpu: DeepSpeed's Adam/AdamW as plain torch optimizers, which need no JIT-compiled op."""
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        params = optimizer.get("params", {})
        if "torch_adam" not in params:
            return {**config, "optimizer": {**optimizer, "params": {**params, "torch_adam": True}}}
    return config

