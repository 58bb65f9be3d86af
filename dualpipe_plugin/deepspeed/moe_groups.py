"""DeepSpeed MoE expert-parallel groups on every rank, whatever layers a re-partition leaves it.

DeepSpeed creates a ``deepspeed.moe.layer.MoE`` layer's expert groups inside ``deepspeed.initialize``
(``MoE.set_deepspeed_parallelism`` -> ``groups._create_expert_and_data_parallel``), on the ranks that hold
such a layer only - and creating a group (``dist.new_group``) is a collective of the whole world. A model
with MoE layers on every stage of DeepSpeed's partition can leave a rank without any under a schedule's
placement (dualpipev's rank 0 holds the first and the last stage): the ranks that have them would wait
for it forever. So after the rebuild the ranks exchange the expert-group settings of the MoE layers they
hold, and every rank creates every group, in one order, before DeepSpeed looks them up (it then finds
them and creates nothing).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["create_expert_groups", "replicas_agree_on_norm"]


def create_expert_groups(module, *, use_data_before_expert_parallel: bool) -> None:
    """Create, on every rank, the expert groups any rank's MoE layers need (a collective of the world)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    mine = sorted({(layer.ep_size, bool(layer.enable_expert_tensor_parallelism))
                   for layer in module.modules() if isinstance(layer, MoE)})
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    needed = sorted({setting for settings in gathered for setting in settings})
    if not needed:
        return
    groups.mpu = module.mpu()  # as DeepSpeedEngine sets it before the layers create their groups
    for ep_size, tensor_parallel in needed:
        if f"ep_size_{ep_size}" in groups._get_expert_parallel_group_dict():
            continue
        if groups.mpu is None or not tensor_parallel:  # the same choice as MoE._create_process_groups
            groups._create_expert_and_data_parallel(
                ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
        else:
            groups._create_expert_data_and_model_parallel(
                ep_size, mpu=groups.mpu, use_data_before_expert_parallel_=use_data_before_expert_parallel)


def replicas_agree_on_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm every data-parallel replica agrees on: with DeepSpeed MoE layers each replica holds
    other experts, so their norms differ; DeepSpeed's own clipping (``runtime.utils.clip_grad_norm_``)
    averages them over the data-parallel group, and so does this. Without MoE layers: ``norm`` itself."""
    from deepspeed.utils import groups

    if not groups._get_expert_parallel_group_dict():
        return norm
    group = groups._get_data_parallel_group()
    averaged = norm / torch.distributed.get_world_size(group=group)
    torch.distributed.all_reduce(averaged, group=group)
    return averaged
