"""The Megatron-Core example's command line: Megatron-LM-style arguments and their checks.

Every refusal raises :class:`~dualpipe_plugin.megatron.errors.MegatronScheduleError` naming the fix;
``--preflight WORLD_SIZE`` runs these checks alone (no torch, no Megatron) before a launcher starts ranks.
"""

from __future__ import annotations

import argparse

from dualpipe_plugin.megatron.args import add_pipeline_schedule_args, apply_schedule_args
from dualpipe_plugin.megatron.registry import MEGATRON
from dualpipe_plugin.megatron.errors import MegatronScheduleError

__all__ = ["PROG", "build_parser", "parse_args", "validate_args"]

PROG = "pretrain_gpt.py"
"""The name the example prints in its messages (that of ``launch/pretrain_gpt.py``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="GPT pretraining on Megatron-Core with the pipeline schedule as one flag: ``--pipeline-schedule``.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, required=True)
    model.add_argument("--hidden-size", type=int, required=True)
    model.add_argument("--num-attention-heads", type=int, required=True)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    model.add_argument("--seq-length", type=int, required=True)
    model.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    model.add_argument("--vocab-size", type=int, default=128, help="synthetic data vocabulary")
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument("--num-experts", type=int, default=None, help="MoE in every layer (alltoall dispatcher)")
    model.add_argument("--moe-router-topk", type=int, default=2)
    model.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    model.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                          help="Megatron's interleaving (--pipeline-schedule megatron only)")
    parallel.add_argument("--expert-model-parallel-size", type=int, default=1)
    add_pipeline_schedule_args(parser)
    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, required=True)
    train.add_argument("--global-batch-size", type=int, required=True)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--train-iters", type=int, required=True)
    train.add_argument("--log-interval", type=int, default=1)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--layout-independent-init", action="store_true",
                       help="draw each weight from a generator seeded by (seed, global parameter name), so "
                            "every schedule and parallel layout starts from the same model (comparisons)")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--use-distributed-optimizer", action="store_true")
    train.add_argument("--overlap-grad-reduce", action="store_true")
    ckpt = parser.add_argument_group("checkpointing")
    ckpt.add_argument("--save", type=str, default=None)
    ckpt.add_argument("--load", type=str, default=None)
    ckpt.add_argument("--save-interval", type=int, default=None)
    run = parser.add_argument_group("running")
    run.add_argument("--cpu", action="store_true",
                     help="run on CPU with gloo (dualpipe_plugin.megatron.enable_cpu_mode): CI and laptops")
    run.add_argument("--nproc", type=int, default=None,
                     help="spawn this many local ranks (gloo) instead of running under torchrun; needs --cpu")
    run.add_argument("--preflight", type=int, default=None, metavar="WORLD_SIZE",
                     help="only check the arguments for WORLD_SIZE ranks (no torch, no Megatron) and exit: "
                          "0 and one summary line, or 2 and one error line (launchers run this first)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Megatron-LM-like checks; every refusal names the fix. Sets data_parallel_size and num_microbatches."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise MegatronScheduleError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel size {tp} x {pp}"
        )
    args.data_parallel_size = world_size // (tp * pp)
    if args.num_experts is None and args.expert_model_parallel_size > 1:
        raise MegatronScheduleError("--expert-model-parallel-size > 1 needs --num-experts")
    if args.num_experts is not None and args.num_experts % args.expert_model_parallel_size:
        raise MegatronScheduleError(
            f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size "
            f"{args.expert_model_parallel_size}"
        )
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise MegatronScheduleError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size x "
            f"data-parallel size = {per_step}"
        )
    args.num_microbatches = args.global_batch_size // per_step
    if args.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            raise MegatronScheduleError(
                "--transformer-impl transformer_engine needs Transformer Engine, which is not installed; "
                "install transformer_engine or use --transformer-impl local"
            ) from None
    if args.cpu and args.transformer_impl == "transformer_engine":
        raise MegatronScheduleError("--cpu runs the local layer spec only; drop --transformer-impl transformer_engine")
    if args.nproc is not None and not args.cpu:
        raise MegatronScheduleError("--nproc spawns gloo ranks on this machine; add --cpu or launch with torchrun")
    if args.layout_independent_init and args.tensor_model_parallel_size > 1:
        raise MegatronScheduleError("--layout-independent-init draws whole tensors: use it with TP=1")
    if args.save_interval is not None and args.save is None:
        raise MegatronScheduleError("--save-interval needs --save DIR")
    if args.pipeline_schedule == MEGATRON and args.virtual_pipeline_model_parallel_size is not None and pp == 1:
        raise MegatronScheduleError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
    if args.pipeline_schedule == MEGATRON and args.virtual_pipeline_model_parallel_size is not None:
        if args.num_layers % (pp * args.virtual_pipeline_model_parallel_size):
            raise MegatronScheduleError("--num-layers must be divisible by pipeline x virtual pipeline size")
    elif args.pipeline_schedule == MEGATRON and args.num_layers % pp:
        raise MegatronScheduleError(f"--num-layers {args.num_layers} is not divisible by {pp} pipeline stages")
    # Unknown schedule, virtual pipeline size with dualpipe(v), layers not divisible into the stages, too
    # few micro-batches: the plugin's own checks. The internal virtual size 2 of dualpipe(v) is not the
    # user's interleaving, so keep it off args.
    user_vp = args.virtual_pipeline_model_parallel_size
    apply_schedule_args(args)
    args.virtual_pipeline_model_parallel_size = user_vp
    return args
