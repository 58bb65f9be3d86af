"""A DeepSpeed user's pipeline training script, written the way such scripts are (test_user_script.py runs it
through the ``deepspeed`` launcher on CPU); the only plugin line is the import.

It builds a small GPT as a ``PipelineModule`` (token embedding tied to the output head, pre-norm blocks -
with ``--moe`` every other block's MLP is ``deepspeed.moe.layer.MoE`` over expert-parallel groups of 2),
then its own optimizer before ``deepspeed.initialize``: AdamW with two parameter groups (no weight decay on
biases, norms and embeddings) and a warm-up LambdaLR bound to it. ZeRO, bf16, clipping and the schedule
come from the JSON config. It can resume from a checkpoint (``--load``; the step comes back in the client
state) and save one (``--save``); ``--dump DIR`` / ``--dump-loaded DIR`` write each rank's weights and
optimizer state by name, at the end / right after loading, for the test.

    deepspeed --num_gpus 4 tests/deepspeed/user_script.py --deepspeed_config ds.json --steps 4 --save ckpt
    (on CPU: DS_ACCELERATOR=cpu; launch/deepspeed_local.sh does it with DUALPIPE_CPU=1)

A refused configuration ends the run with one ``user_script.py: error: ...`` line per rank and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by the launcher: the repository's package from this clone
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dualpipe_plugin.distributed import print_error_line  # noqa: E402
from dualpipe_plugin.examples.deepspeed_gpt.model import (  # noqa: E402
    VOCAB,
    Block,
    PositionEmbedding,
    TokenEmbedding,
    lm_head,
    lm_loss,
)

HIDDEN, HEADS, SEQ, LAYERS = 32, 4, 16, 4


class MoEBlock(Block):
    """A block whose MLP is DeepSpeed's MoE layer (4 experts, top-1, room for every token)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__(hidden, heads)
        from deepspeed.moe.layer import MoE

        del self.fc1, self.fc2
        expert = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.moe = MoE(hidden, expert, num_experts=4, ep_size=2, k=1, use_rts=False, capacity_factor=4.0,
                       min_capacity=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(hidden, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, hidden))
        out, _, _ = self.moe(self.norm2(x))
        return x + out


def build_model(moe: bool):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    blocks = [LayerSpec(MoEBlock if moe and i % 2 else Block, HIDDEN, HEADS) for i in range(LAYERS)]
    specs = [TiedLayerSpec("embed", TokenEmbedding, VOCAB, HIDDEN), LayerSpec(PositionEmbedding, SEQ, HIDDEN),
             *blocks, LayerSpec(nn.LayerNorm, HIDDEN),
             TiedLayerSpec("embed", TokenEmbedding, VOCAB, HIDDEN, forward_fn=lm_head)]
    return PipelineModule(layers=specs, num_stages=2, loss_fn=lm_loss, partition_method="type:Block")


def batches(step: int, dp_id: int, micro_batches: int, micro_batch_size: int):
    for micro in range(micro_batches):
        generator = torch.Generator().manual_seed((step * 1009 + dp_id) * 1013 + micro)
        tokens = torch.randint(0, VOCAB, (micro_batch_size, SEQ + 1), generator=generator)
        yield tokens[:, :-1], tokens[:, 1:]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="user_script.py")
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("--steps", type=int, required=True, help="train up to this step count")
    parser.add_argument("--moe", action="store_true")
    parser.add_argument("--save", default=None)
    parser.add_argument("--save-tag", default=None)
    parser.add_argument("--load", default=None)
    parser.add_argument("--load-tag", default=None)
    parser.add_argument("--dump", default=None, help="write each rank's weights and optimizer state at the end")
    parser.add_argument("--dump-loaded", default=None, help="the same, right after load_checkpoint")
    parser.add_argument("--no-plugin", action="store_true", help="plain DeepSpeed (its own engine)")
    parser.add_argument("--cpu", action="store_true", help="accepted from launch/deepspeed_local.sh (DS_ACCELERATOR=cpu)")
    return parser.parse_args(argv)


def train(args) -> None:
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # CPU: no JIT-built inference op
    if not args.no_plugin:
        import dualpipe_plugin.deepspeed  # noqa: F401 - "pipeline": {"schedule": ...} now selects the schedule
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(1234)
    model = build_model(args.moe)

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name or "embed" in name else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": 0.1},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if args.moe:  # DeepSpeed's rule: expert parameters in groups of their own, marked "moe"
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    with open(args.deepspeed_config) as handle:
        config = json.load(handle)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    start = 0
    if args.load:
        _, client_state = engine.load_checkpoint(args.load, tag=args.load_tag)
        start = client_state["step"]
        if args.dump_loaded:
            dump(engine, args.dump_loaded)
    dp_id = engine.grid.get_data_parallel_id()
    for step in range(start, args.steps):
        data = batches(step, dp_id, engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu())
        loss = engine.train_batch(data_iter=data)
        if engine.global_rank == 0:
            print(json.dumps({"step": step, "loss": float(loss), "lr": scheduler.get_last_lr()}), flush=True)
    if args.save:
        engine.save_checkpoint(args.save, tag=args.save_tag, client_state={"step": args.steps})
    if args.dump:
        dump(engine, args.dump)
    torch.distributed.barrier()


def dump(engine, directory: str) -> None:
    """This rank's weights, fp32 master weights and Adam moments by parameter name (DeepSpeed's accessors)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    relink = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if relink is not None:  # DeepSpeed 0.19.8's ZeRO-1/2 links these views once, after the FIRST group's first
        engine.optimizer._hp_optimizer_states_linked = False  # step, so a second group's stay empty: link again
        relink()
    state = {"dp_id": engine.grid.get_data_parallel_id()}
    for name, param in engine.module.named_parameters():
        state[name] = {"weight": param.detach().float().clone(), "fp32": safe_get_full_fp32_param(param).clone(),
                       **{key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}}
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, f"rank{engine.global_rank}.pt"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as error:  # DeepSpeedPipelineConfigError and its kin: the user's mistake, one line
        print_error_line(f"user_script.py: error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
