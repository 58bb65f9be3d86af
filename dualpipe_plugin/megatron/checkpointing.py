"""Distributed checkpoints of a model built by this adapter, for users of their own training loop.

Megatron distributed checkpoints of every chunk and the optimizer under ``ROOT/iter_NNNNNNN/``, with
``ROOT/latest_checkpointed_iteration.txt`` naming the newest (Megatron-LM's layout)::

    from dualpipe_plugin.megatron.checkpointing import load_checkpoint, save_checkpoint
    save_checkpoint(model, optimizer, "ckpt", iteration)    # every rank
    start = load_checkpoint(model, optimizer, "ckpt")       # 0 when there is none

Layer keys are global (the placement numbers layers as Megatron would), so a checkpoint written under
one schedule loads under another with the same tensor/expert-parallel sizes. DualPipe's mirrored copies
(chunk 1 of every rank repeats a stage its mirror rank holds as chunk 0) are marked as replicas, so each
stage is saved once and both copies load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["load_checkpoint", "model_sharded_state_dict", "save_checkpoint"]


def model_sharded_state_dict(model: Sequence[Any]) -> dict:
    """``{"model0": ..., "model1": ...}``: every chunk's sharded state dict (mirrored copies answer as
    replicas: :func:`~dualpipe_plugin.megatron.placement.mark_copies_as_replicas`, done when the model is
    built)."""
    from dualpipe_plugin.megatron.placement import unwrap

    return {f"model{index}": unwrap(chunk).sharded_state_dict() for index, chunk in enumerate(model)}


OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""What Megatron-LM's checkpointing passes: the distributed optimizer's default sharding
('fully_sharded_model_space') makes flattened-range tensors that distributed checkpointing refuses
("ShardedTensor.flattened_range is not supported"); 'dp_reshardable' follows the DDP bucket layout, so a
distributed-optimizer checkpoint resumes under the layout that wrote it (as Megatron's own). Ignored by
the other optimizers."""


def _checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def save_checkpoint(model: Sequence[Any], optimizer: Any, root: str | Path, iteration: int) -> None:
    """Write ``iteration``'s checkpoint under ``root`` (collective: every rank calls it)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = _checkpoint_dir(root, iteration)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = model_sharded_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state["iteration"] = iteration
    dist_checkpointing.save(state, str(directory))
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def load_checkpoint(model: Sequence[Any], optimizer: Any, root: str | Path) -> int:
    """Load the newest checkpoint under ``root`` into ``model`` and ``optimizer``; return its iteration (0
    when there is none). Collective."""
    from megatron.core import dist_checkpointing

    from dualpipe_plugin.megatron.placement import unwrap

    marker = Path(root) / "latest_checkpointed_iteration.txt"
    if not marker.exists():
        return 0
    iteration = int(marker.read_text().strip())
    state = model_sharded_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    state["iteration"] = 0
    loaded = dist_checkpointing.load(state, str(_checkpoint_dir(root, iteration)))
    for index, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded[f"model{index}"])
    optimizer.load_state_dict(loaded["optimizer"])
    return iteration
