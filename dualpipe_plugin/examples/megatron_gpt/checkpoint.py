"""The Megatron-Core example's checkpoints: Megatron distributed checkpoints of every chunk and the
optimizer under ``iter_NNNNNNN/``, with ``latest_checkpointed_iteration.txt`` naming the newest.

Layer keys are global (the plugin's placement numbers layers as Megatron's would), so a checkpoint
written under one schedule loads under another. DualPipe's mirrored copies are saved once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["mark_mirrored_replicas", "model_sharded_state_dict", "save_checkpoint", "load_checkpoint"]


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
