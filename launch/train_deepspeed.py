"""A small GPT trained with DeepSpeed pipeline parallelism on a DualPipe schedule: a script to copy.

One GPU per process; P pipeline stages; the processes beyond P are data-parallel replicas (dp = world / P).
The schedule is the config's ``"pipeline": {"schedule": "dualpipev"}`` (or dualpipe, 1f1b, zb1p, deepspeed)::

    torchrun --nproc-per-node 8 launch/train_deepspeed.py --deepspeed_config configs/deepspeed/dualpipev.json \
        --pipeline-stages 4 --steps 200
    deepspeed --num_gpus 8 launch/train_deepspeed.py --deepspeed_config ... --pipeline-stages 4
    launch/torchrun_local.sh 4 launch/train_deepspeed.py --cpu --deepspeed_config ... --steps 2   # CPU, gloo

The model: a token embedding and a learned position embedding, ``--layers`` pre-norm transformer blocks
of plain torch layers, a final LayerNorm and an output head that shares the embedding's weight (a
``TiedLayerSpec``). The data: a character-level corpus generated in code (a small deterministic grammar,
no download), byte-valued tokens, random windows chosen by (step, replica, micro-batch).

``--preflight N`` checks the arguments and the config for a job of N processes in this one process and
exits (0 and an ``ok`` line, or 2 and one ``error:`` line); the launch scripts run it before they start
any rank, so a wrong path or a schedule the rank count cannot run fails in a second, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script from a clone: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROG = "train_deepspeed.py"
VOCAB = 128
"""Tokens are the bytes of an ASCII corpus."""


# --- the model: DeepSpeed layer specs -----------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """``weight[ids]``; the same module (through a TiedLayerSpec) is the output head ``h @ weight.T``."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) int64 -> (B, T, D)
        return F.embedding(ids, self.weight)


def lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The tied output use of the embedding: (B, T, D) -> (B, T, V) logits."""
    return F.linear(hidden, embedding.weight)


class PositionEmbedding(nn.Module):
    def __init__(self, seq_len: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(seq_len, hidden) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        return x + self.weight[: x.shape[1]]


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(hidden, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, in fp32 so bf16 runs report comparable losses."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def layer_specs(args) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec("embed", TokenEmbedding, VOCAB, args.hidden),
        LayerSpec(PositionEmbedding, args.seq_len, args.hidden),
        *[LayerSpec(Block, args.hidden, args.heads) for _ in range(args.layers)],
        LayerSpec(nn.LayerNorm, args.hidden),
        TiedLayerSpec("embed", TokenEmbedding, VOCAB, args.hidden, forward_fn=lm_head),
    ]


# --- the data: a generated character-level corpus ----------------------------------------------------

_SUBJECTS = ["the pipeline", "a rank", "the scheduler", "every stage", "the expert", "a micro-batch",
             "the first chunk", "the mirrored copy", "the optimizer", "the router"]
_VERBS = ["sends", "receives", "overlaps", "computes", "waits for", "forwards", "reduces", "hides",
          "splits", "defers"]
_OBJECTS = ["the activations", "its gradients", "a bubble", "the all-to-all", "two chunks", "the weights",
            "the loss", "the next batch", "a tensor", "the schedule"]
_ENDINGS = [".", " quickly.", " in both directions.", " without a bubble.", " before the next step.",
            " and then rests."]


def make_corpus(seed: int, sentences: int = 4000) -> torch.Tensor:
    """A deterministic ASCII text from a small grammar, as a 1-D int64 tensor of byte values."""
    rng = random.Random(seed)
    text = " ".join(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        for _ in range(sentences)
    )
    return torch.tensor(list(text.encode("ascii")), dtype=torch.long)


def batches(corpus: torch.Tensor, args, micro_batch_size: int, micro_batches: int, dp_id: int, start_step: int):
    """Endless (inputs, labels) micro-batches for one data-parallel replica; a pure function of the step."""
    per_step = 0
    step = start_step
    while True:
        generator = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 1009 + dp_id) * 1013 + per_step)
        starts = torch.randint(0, corpus.numel() - args.seq_len - 1, (micro_batch_size,), generator=generator)
        window = torch.stack([corpus[s : s + args.seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]
        per_step += 1
        if per_step == micro_batches:
            per_step, step = 0, step + 1


# --- arguments, config and their checks -------------------------------------------------------------


class UsageError(Exception):
    """A mistake in the command line or the config: printed as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
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
    from dualpipe_plugin.schedules import ScheduleConfigError, build_schedule, schedule_names

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
    model_stages = 2 * stages if schedule == "dualpipev" else stages
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


# --- training -------------------------------------------------------------------------------------


def cpu_config(config: dict) -> dict:
    """The config for --cpu: DeepSpeed's Adam/AdamW as plain torch optimizers, which need no JIT-compiled op."""
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        params = optimizer.get("params", {})
        if "torch_adam" not in params:
            return {**config, "optimizer": {**optimizer, "params": {**params, "torch_adam": True}}}
    return config


def train(args, config: dict) -> None:
    if args.cpu:
        config = cpu_config(config)
        os.environ["DS_ACCELERATOR"] = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:  # the deepspeed launcher does not set it; torchrun does
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    env_from_slurm()
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
    stages, micro_batches, schedule = check_job(args, config, world_size)

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
    args = parse_args(argv)
    try:
        config = read_config(args.deepspeed_config)
        if args.preflight is not None:
            stages, micro_batches, schedule = check_job(args, config, args.preflight)
            print(f"{PROG}: ok: {args.preflight} processes, schedule {schedule}, {stages} stages x "
                  f"{args.preflight // stages} replicas, {micro_batches} micro-batches/step")
            return 0
        train(args, config)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
