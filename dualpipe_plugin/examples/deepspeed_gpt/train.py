"""The DeepSpeed example's training loop and entry point: DeepSpeed initialised (on its CPU accelerator with
``--cpu``), the model built as a ``PipelineModule``, ``deepspeed.initialize`` running the config's
``"pipeline": {"schedule": ...}`` through :mod:`dualpipe_plugin.deepspeed`, ``train_batch`` per step,
logging and checkpoints."""

from __future__ import annotations

import math
import os
import time

import torch

from dualpipe_plugin.distributed import print_error_line
from dualpipe_plugin.examples.deepspeed_gpt.data import batches, make_corpus
from dualpipe_plugin.examples.deepspeed_gpt import job
from dualpipe_plugin.examples.deepspeed_gpt.job import PROG, UsageError
from dualpipe_plugin.examples.deepspeed_gpt.model import layer_specs, lm_loss

__all__ = ["train", "main"]


def train(args, config: dict) -> None:
    if args.cpu:
        config = job.cpu_config(config)
        os.environ["DS_ACCELERATOR"] = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher does not set it; torchrun does
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    job.env_from_slurm()
    import deepspeed

    if args.cpu:
        # The CPU shared-memory comm op would be JIT-compiled at init_distributed; it only serves inference
        # all-reduce. Marking it incompatible is DeepSpeed's own fallback (see tests/deepspeed/harness.py).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import dualpipe_plugin.deepspeed  # makes deepspeed.initialize run "pipeline.schedule"

    deepspeed.init_distributed(dist_backend="gloo" if args.cpu else None)
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    stages, micro_batches, schedule = job.check_job(args, config, world_size)

    torch.manual_seed(args.seed)  # the same initial weights on every replica
    model = deepspeed.pipe.PipelineModule(
        layers=layer_specs(args), num_stages=stages, loss_fn=lm_loss, partition_method=args.partition_method,
    )
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config,
        )
    except dualpipe_plugin.deepspeed.DeepSpeedPipelineConfigError as error:
        raise UsageError(str(error)) from None
    start = 0
    if args.load:
        path, client = engine.load_checkpoint(args.load)
        if path is None:
            raise UsageError(f"no checkpoint found in --load {args.load!r}")
        start = int(client.get("step", 0))
    dp_id = engine.grid.get_data_parallel_id()
    data = batches(make_corpus(args.seed), args, engine.train_micro_batch_size_per_gpu(), micro_batches, dp_id,
                   start)
    tokens_per_step = engine.train_batch_size() * args.seq_len
    if rank == 0:
        print(f"{PROG}: schedule {schedule}, {stages} stages x {world_size // stages} replicas, "
              f"{micro_batches} micro-batches/step, {args.layers} blocks, steps {start + 1}..{args.steps}",
              flush=True)
    tick = time.perf_counter()
    loss = math.nan
    for step in range(start + 1, args.steps + 1):
        loss = float(engine.train_batch(data_iter=data))
        if step % args.log_interval == 0 or step == args.steps:
            elapsed = time.perf_counter() - tick
            steps_done = args.log_interval if step % args.log_interval == 0 else step % args.log_interval
            if rank == 0:
                print(f"step {step}/{args.steps} | loss {loss:.4f} | {1000 * elapsed / steps_done:.0f} ms/step | "
                      f"{tokens_per_step * steps_done / elapsed:.0f} tokens/s", flush=True)
            tick = time.perf_counter()
        if args.save and args.save_interval and step % args.save_interval == 0 and step != args.steps:
            engine.save_checkpoint(args.save, tag=f"step{step}", client_state={"step": step})
    if args.save and args.steps > start:
        engine.save_checkpoint(args.save, tag=f"step{args.steps}", client_state={"step": args.steps})
    if rank == 0:
        print(f"{PROG}: done, final loss {loss:.4f}", flush=True)
    # Leave together: a rank that tears down gloo while a peer is still finishing its step can abort it.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    args = job.parse_args(argv)
    try:
        config = job.read_config(args.deepspeed_config)
        if args.preflight is not None:
            stages, micro_batches, schedule = job.check_job(args, config, args.preflight)
            print(f"{PROG}: ok: {args.preflight} processes, schedule {schedule}, {stages} stages x "
                  f"{args.preflight // stages} replicas, {micro_batches} micro-batches/step")
            return 0
        train(args, config)
    except UsageError as error:
        print_error_line(f"{PROG}: error: {error}")
        return 2
    return 0

