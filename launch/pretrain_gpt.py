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

``--pipeline-schedule``: ``megatron`` (Megatron-Core's own 1F1B, or interleaved with
``--virtual-pipeline-model-parallel-size``), ``dualpipev``, ``dualpipe``, ``1f1b``, ``zb1p``. Everything else
is Megatron-Core: ``parallel_state`` (TP, PP, DP, EP), ``GPTModel`` (local layer spec; Transformer Engine
when ``--transformer-impl transformer_engine`` and installed), DDP, the (distributed) optimizer,
``finalize_model_grads``, distributed checkpointing (``--save``/``--load``; layer keys are global, so a
checkpoint written under one schedule loads under another with the same TP/EP sizes).

Data is synthetic and learnable (each sequence counts up from a random start by a random step, modulo the
vocabulary), generated from ``--seed`` per iteration and global micro-batch, so every data-parallel,
pipeline and schedule layout sees the same tokens. Only the chunks that hold the embedding or the loss
read it. The loss printed is Megatron-LM's: token-weighted mean over the global batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dualpipe_plugin.megatron.args import add_pipeline_schedule_args, apply_schedule_args  # noqa: E402
from dualpipe_plugin.megatron.errors import MegatronScheduleError  # noqa: E402


# ------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
    if args.pipeline_schedule == "megatron" and args.virtual_pipeline_model_parallel_size is not None and pp == 1:
        raise MegatronScheduleError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
    if args.pipeline_schedule == "megatron" and args.virtual_pipeline_model_parallel_size is not None:
        if args.num_layers % (pp * args.virtual_pipeline_model_parallel_size):
            raise MegatronScheduleError("--num-layers must be divisible by pipeline x virtual pipeline size")
    elif args.pipeline_schedule == "megatron" and args.num_layers % pp:
        raise MegatronScheduleError(f"--num-layers {args.num_layers} is not divisible by {pp} pipeline stages")
    # Unknown schedule, virtual pipeline size with dualpipe(v), layers not divisible into the stages, too
    # few micro-batches: the plugin's own checks. The internal virtual size 2 of dualpipe(v) is not the
    # user's interleaving, so keep it off args.
    user_vp = args.virtual_pipeline_model_parallel_size
    apply_schedule_args(args)
    args.virtual_pipeline_model_parallel_size = user_vp
    return args


# -------------------------------------------------------------------------------------------- model


def transformer_config(args: argparse.Namespace):
    import torch
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        use_cpu_initialization=args.cpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # gloo (--cpu): directions kept apart (cpu_mode docstring); NCCL: Megatron-LM's default.
        batch_p2p_comm=not args.cpu,
        deallocate_pipeline_outputs=not args.cpu,
    )
    if args.num_experts is not None:
        kwargs.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            add_bias_linear=False,  # Megatron-Core 0.16.1 SequentialMLP + bias at TP=1: in-place autograd error
        )
    if args.pipeline_model_parallel_size == 2 and args.virtual_pipeline_model_parallel_size is not None:
        kwargs["batch_p2p_comm"] = False  # Megatron's interleaved PP=2 batched sends swap directions
    return TransformerConfig(**kwargs)


def model_provider(args: argparse.Namespace, config):
    """Megatron-LM's ``model_provider(pre_process, post_process, vp_stage)``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if args.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=args.num_experts, moe_grouped_gemm=False)
    else:
        spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=False)

    def provider(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.vocab_size,
            max_sequence_length=args.max_position_embeddings or args.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            vp_stage=vp_stage,
        )

    return provider


def build_model(args: argparse.Namespace, config) -> list:
    """This rank's chunks, wrapped as Megatron-LM's ``get_model`` does (Float16Module for bf16, then DDP)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from dualpipe_plugin.megatron import build_model_chunks, configure_model_config

    configure_model_config(config, args.pipeline_schedule)
    provider = model_provider(args, config)
    if args.pipeline_schedule == "megatron":  # Megatron's placement, interleaved when asked
        vp = args.virtual_pipeline_model_parallel_size
        chunks = [
            provider(
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i if vp else None),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i if vp else None),
                vp_stage=i if vp else None,
            )
            for i in range(vp or 1)
        ]
    else:
        chunks = build_model_chunks(provider, config)
    if args.layout_independent_init:
        for chunk in chunks:
            layout_independent_init(chunk, args.seed)
        if args.pipeline_schedule in ("dualpipe", "dualpipev"):
            from dualpipe_plugin.megatron.placement import synchronize_initial_copies

            synchronize_initial_copies(chunks, pp_group=parallel_state.get_pipeline_model_parallel_group())
    if not args.cpu:
        import torch

        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    if args.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    return model


def global_param_name(module, local_name: str) -> str:
    """A parameter's name in the whole model: layers by Megatron's global ``layer_number``, experts by
    global index, a tied output layer as the word embedding."""
    import re

    from megatron.core import parallel_state

    name = local_name
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if match:
        layer = module.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"
        expert = re.match(r"(.*\.local_experts)\.(\d+)\.(.*)", name)
        if expert:
            first = parallel_state.get_expert_model_parallel_rank() * layer.mlp.num_local_experts
            name = f"{expert.group(1)}.{first + int(expert.group(2))}.{expert.group(3)}"
    if local_name == "output_layer.weight" and module.share_embeddings_and_output_weights:
        name = "embedding.word_embeddings.weight"
    return name


def layout_independent_init(chunk, seed: int) -> None:
    """Weights ~ N(0, 0.02) (norm weights 1, biases 0) from a generator seeded by the global name (TP=1)."""
    import zlib

    import torch

    with torch.no_grad():
        for local_name, param in chunk.named_parameters():
            name = global_param_name(chunk, local_name)
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def mark_mirrored_replicas(sharded_state_dict: dict) -> dict:
    """DualPipe's chunk 1 repeats stages held as chunk 0 on the mirror rank: mark its tensors as replicas,
    so distributed checkpointing saves each stage once (from chunk 0)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedBase):
            replica = value.replica_id if isinstance(value.replica_id, tuple) else (value.replica_id,)
            value.replica_id = (replica[0] + 1,) + tuple(replica[1:])
    return sharded_state_dict


def model_sharded_state_dict(args: argparse.Namespace, model: list) -> dict:
    from dualpipe_plugin.megatron.placement import unwrap

    state = {}
    for index, chunk in enumerate(model):
        sharded = unwrap(chunk).sharded_state_dict()
        if args.pipeline_schedule == "dualpipe" and index == 1:
            sharded = mark_mirrored_replicas(sharded)
        state[f"model{index}"] = sharded
    return state


# --------------------------------------------------------------------------------------------- data


def synthetic_batch(args: argparse.Namespace, iteration: int, microbatch: int, device) -> dict:
    """One micro-batch (global index ``microbatch``) of counting sequences; the same on every rank."""
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + iteration * 10_007 + microbatch)
    size, length, vocab = args.micro_batch_size, args.seq_length, args.vocab_size
    start = torch.randint(0, vocab, (size, 1), generator=gen)
    step = torch.randint(1, 5, (size, 1), generator=gen)
    stream = (start + step * torch.arange(length + 1)) % vocab
    batch = dict(
        tokens=stream[:, :-1].contiguous(),
        labels=stream[:, 1:].contiguous(),
        loss_mask=torch.ones(size, length),
        position_ids=torch.arange(length).unsqueeze(0).expand(size, -1).contiguous(),
    )
    return {k: v.to(device) for k, v in batch.items()}


def data_iterator(args: argparse.Namespace, iteration: int, device):
    """This data-parallel rank's micro-batches of ``iteration``."""
    from megatron.core import parallel_state

    first = parallel_state.get_data_parallel_rank() * args.num_microbatches
    for m in range(first, first + args.num_microbatches):
        yield synthetic_batch(args, iteration, m, device)


def loss_func(loss_mask, output_tensor):
    """Megatron-LM's GPT convention: ``(loss sum, num tokens, {'lm loss': [sum, tokens]})``."""
    import torch

    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """Megatron-LM's ``forward_step``: data only on chunks that hold the embedding or the loss."""
    from dualpipe_plugin.megatron.placement import unwrap

    module = unwrap(model)
    if module.pre_process or module.post_process:
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])
    return model(None, None, None), partial(loss_func, None)


# -------------------------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank (losses only where they are reported)."""

    losses: list[float] = field(default_factory=list)
    """Per iteration run, Megatron-LM's reported 'lm loss' (last pipeline rank; empty elsewhere)."""
    first_iteration: int = 0
    step_ms: list[float] = field(default_factory=list)


def _checkpoint_dir(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def save_checkpoint(args, model, optimizer, iteration: int) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = _checkpoint_dir(args.save, iteration)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = model_sharded_state_dict(args, model)
    state["optimizer"] = optimizer.sharded_state_dict(state)
    state["iteration"] = iteration
    dist_checkpointing.save(state, str(directory))
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(args.save) / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def load_checkpoint(args, model, optimizer) -> int:
    """Load the latest checkpoint under ``--load``; return its iteration (0 when there is none)."""
    from megatron.core import dist_checkpointing

    from dualpipe_plugin.megatron.placement import unwrap

    marker = Path(args.load) / "latest_checkpointed_iteration.txt"
    if not marker.exists():
        return 0
    iteration = int(marker.read_text().strip())
    state = model_sharded_state_dict(args, model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True)
    state["iteration"] = 0
    loaded = dist_checkpointing.load(state, str(_checkpoint_dir(args.load, iteration)))
    for index, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded[f"model{index}"])
    optimizer.load_state_dict(loaded["optimizer"])
    return iteration


def train(args: argparse.Namespace) -> TrainResult:
    """Initialise Megatron-Core on the running torch.distributed world and train (see the module docstring)."""
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
            args.virtual_pipeline_model_parallel_size if args.pipeline_schedule == "megatron" else None
        ),
        expert_model_parallel_size=args.expert_model_parallel_size,
        create_gloo_process_groups=True,
    )
    try:
        torch.manual_seed(args.seed)
        model_parallel_cuda_manual_seed(args.seed)
        device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
        config = transformer_config(args)
        model = build_model(args, config)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                bf16=args.bf16, params_dtype=config.params_dtype,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            model,
        )
        start = load_checkpoint(args, model, optimizer) if args.load else 0
        forward_backward = get_forward_backward_func()  # dispatches on config.pipeline_schedule
        is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        reporter = is_last and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_tensor_model_parallel_rank() == 0
        result = TrainResult(first_iteration=start)
        for iteration in range(start, args.train_iters):
            began = time.perf_counter()
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            iterators = [data_iterator(args, iteration, device) for _ in model]
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
                save_checkpoint(args, model, optimizer, iteration + 1)
        if args.save and (not args.save_interval or args.train_iters % args.save_interval):
            save_checkpoint(args, model, optimizer, args.train_iters)
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
        print(f"pretrain_gpt.py: ok: {args.pipeline_schedule} on {args.preflight} ranks = TP "
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


if __name__ == "__main__":
    try:
        main()
    except MegatronScheduleError as error:
        print(f"pretrain_gpt.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
