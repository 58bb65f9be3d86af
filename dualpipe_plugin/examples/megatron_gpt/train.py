"""The Megatron-Core example's training loop and entry point: Megatron-Core initialised on the running
torch.distributed world (or on ``--nproc`` spawned gloo ranks), ``get_forward_backward_func()`` from the
plugin (dispatching on ``config.pipeline_schedule``), Megatron's optimizer, logging and checkpoints."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass, field

from dualpipe_plugin.distributed import print_error_line
from dualpipe_plugin.examples.megatron_gpt.arguments import PROG, parse_args, validate_args
from dualpipe_plugin.megatron.checkpointing import load_checkpoint, save_checkpoint
from dualpipe_plugin.examples.megatron_gpt.model import build_model, model_config, reference_model
from dualpipe_plugin.megatron.errors import MegatronScheduleError
from dualpipe_plugin.reference.megatron_gpt import TinyGPT, forward_step, learnable_batch

__all__ = ["TrainResult", "data_iterator", "train", "run", "main", "command_line"]


def data_iterator(model: TinyGPT, num_microbatches: int, iteration: int, device):
    """This data-parallel rank's micro-batches of ``iteration`` (global numbering, so every layout sees the
    same tokens)."""
    from megatron.core import parallel_state

    first = parallel_state.get_data_parallel_rank() * num_microbatches
    for m in range(first, first + num_microbatches):
        yield {k: v.to(device) for k, v in learnable_batch(model, iteration, m).items()}


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank (losses only where they are reported)."""

    losses: list[float] = field(default_factory=list)
    """Per iteration run, Megatron-LM's reported 'lm loss' (last pipeline rank; empty elsewhere)."""
    first_iteration: int = 0
    step_ms: list[float] = field(default_factory=list)


def train(args: argparse.Namespace) -> TrainResult:
    """Initialise Megatron-Core on the running torch.distributed world and train (see the package docstring)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dualpipe_plugin.megatron import get_forward_backward_func

    validate_args(args, dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=(
            args.virtual_pipeline_model_parallel_size if args.pipeline_options is None else None
        ),
        expert_model_parallel_size=args.expert_model_parallel_size,
        create_gloo_process_groups=True,
    )
    try:
        torch.manual_seed(args.seed)
        model_parallel_cuda_manual_seed(args.seed)
        device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
        config = model_config(args)
        model = build_model(args, config)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                bf16=args.bf16, params_dtype=config.params_dtype,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            model,
        )
        start = load_checkpoint(model, optimizer, args.load) if args.load else 0
        forward_backward = get_forward_backward_func()  # dispatches on config.pipeline_schedule
        is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        reporter = is_last and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_tensor_model_parallel_rank() == 0
        result = TrainResult(first_iteration=start)
        gpt = reference_model(args)
        for iteration in range(start, args.train_iters):
            began = time.perf_counter()
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            iterators = [data_iterator(gpt, args.num_microbatches, iteration, device) for _ in model]
            store = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iterators if len(model) > 1 else iterators[0],
                model=model,
                num_microbatches=args.num_microbatches,
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                forward_only=False,
            )
            ok, grad_norm, _ = optimizer.step()
            if is_last:
                report = torch.stack([entry["lm loss"] for entry in store]).sum(dim=0)
                dist.all_reduce(report, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
                result.losses.append(float(report[0] / report[1]))
            result.step_ms.append((time.perf_counter() - began) * 1e3)
            if reporter and ((iteration + 1) % args.log_interval == 0 or iteration == start):
                print(
                    f"iteration {iteration + 1:6d}/{args.train_iters} | schedule {args.pipeline_schedule} | "
                    f"lm loss {result.losses[-1]:.6f} | grad norm {float(grad_norm or 0):.4f} | "
                    f"step {result.step_ms[-1]:.1f} ms" + ("" if ok else " | skipped"),
                    flush=True,
                )
            if args.save and args.save_interval and (iteration + 1) % args.save_interval == 0:
                save_checkpoint(model, optimizer, args.save, iteration + 1)
        if args.save and (not args.save_interval or args.train_iters % args.save_interval):
            save_checkpoint(model, optimizer, args.save, args.train_iters)
        return result
    finally:
        parallel_state.destroy_model_parallel()


def run(args: argparse.Namespace) -> TrainResult:
    """:func:`train` inside CPU mode when ``--cpu``."""
    if not args.cpu:
        return train(args)
    from dualpipe_plugin.megatron import enable_cpu_mode

    with enable_cpu_mode():
        return train(args)


def _local_rank(rank: int, world_size: int, argv: list[str]) -> TrainResult:
    return run(parse_args(argv))


def main(argv: list[str] | None = None) -> TrainResult | list[TrainResult]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.preflight is not None:
        validate_args(args, args.preflight)
        print(f"{PROG}: ok: {args.pipeline_schedule} on {args.preflight} ranks = TP "
              f"{args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x DP "
              f"{args.data_parallel_size}, {args.num_microbatches} micro-batches per step")
        return TrainResult()
    if args.nproc is not None:
        from dualpipe_plugin.launch import run_local

        # Fail fast on bad arguments in the parent (world size = --nproc).
        validate_args(parse_args(argv), args.nproc)
        child = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
        child = [a for a in child if not a.startswith("--nproc=")]
        return run_local(_local_rank, args.nproc, args=(child,), timeout_s=24 * 3600)
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if not args.cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if args.cpu else "nccl", timeout=datetime.timedelta(minutes=10))
    return run(args)


def command_line(argv: list[str] | None = None) -> int:
    """:func:`main` as a program: a refused argument is one ``error:`` line and exit status 2."""
    try:
        main(argv)
    except MegatronScheduleError as error:
        print_error_line(f"{PROG}: error: {error}")
        return 2
    return 0
