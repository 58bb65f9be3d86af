"""Optimizer state by GLOBAL parameter name: read from DeepSpeed's checkpoint files written under any placement,
written into this engine's optimizer (another schedule, pipeline size or data-parallel size).

DeepSpeed saves optimizer state per rank, in one of two forms, and this module reads both by name:

* "torch" (a torch optimizer, fp32 without ZeRO): ``optimizer.state_dict()`` in ``mp_rank_XX_model_states.pt``
  (``expp_rank_E_mp_rank_XX_optim_states.pt`` with MoE), whose state is keyed by position; the placement
  record's ``optimizer_order`` names the positions (:func:`read_torch_state`);
* "flat" (BF16_Optimizer, ZeRO-1/2): ``[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt``, each a data-parallel
  partition of flat fp32 groups and flat optimizer state with DeepSpeed's own name -> fragment map
  (``param_slice_mappings``); a parameter is its fragments from every partition, in partition order - the
  extraction DeepSpeed's ``ds_to_universal`` does offline (:func:`read_flat_state`).

Written back: a torch optimizer through its own ``load_state_dict`` (:func:`apply_torch_state`); a flat one
through DeepSpeed's universal-checkpoint loader (``optimizer.load_state_dict(checkpoint_folder=...)``), fed a
folder in the universal layout that holds exactly this rank's parameters (:func:`apply_flat_state`): DeepSpeed's
own code maps each full tensor onto this rank's fragments.

Expert parameters of DeepSpeed MoE layers are named by GLOBAL expert id here (their checkpoint names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from dualpipe_plugin.deepspeed.placement_record import ExpertNames, Placement

__all__ = ["NamedState", "read_torch_state", "read_flat_state", "apply_torch_state", "apply_flat_state",
           "optimizer_names"]


@dataclass
class NamedState:
    """Optimizer state of some parameters, by global name."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """name -> {"fp32": master weights (flat form only), "exp_avg": ..., ...}, each the full tensor."""
    steps: dict[str, Any] = field(default_factory=dict)
    options: dict[str, dict] = field(default_factory=dict)
    """name -> the hyper-parameters of its saved group (lr as the scheduler left it, ...)."""
    known: set[str] = field(default_factory=set)
    """Names the saved optimizer held (with or without state: a parameter that never had a gradient has none)."""


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _layer_of(name: str) -> int | None:
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _saved_holders(saved: Placement, names: set[str]) -> list[int]:
    """The saving pipeline ranks whose files can hold ``names`` (all of them for a tied module)."""
    layers = {_layer_of(name) for name in names}
    if None in layers or not saved.parts:
        return list(range(saved.pipeline_ranks))
    holders = set()
    for rank, stages in enumerate(saved.stages):
        for stage in stages:
            if any(saved.parts[stage] <= layer < saved.parts[stage + 1] for layer in layers):
                holders.add(rank)
    return sorted(holders)


def _options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def optimizer_names(engine) -> list[list[str]]:
    """Global names of the parameters in each of this engine's (base) optimizer groups."""
    names = ExpertNames.of_module(engine.module)
    optimizer = engine.optimizer
    groups = getattr(optimizer, "bf16_groups", None) or getattr(optimizer, "bit16_groups", None)
    if groups is None:
        groups = [group["params"] for group in optimizer.param_groups]
    return [[names.to_global(engine.param_names[p]) for p in group] for group in groups]


def read_torch_state(directory: str, saved: Placement, wanted: set[str]) -> NamedState:
    """Torch optimizer state of ``wanted`` from the saving ranks' state dicts (see the module docstring).

    A saving rank with MoE layers wrote its state per expert-parallel rank (``expp_rank_E_mp_rank_XX``, by
    the first rank of each expert-data-parallel group); one without, in its ``mp_rank_XX`` file."""
    state = NamedState()
    for rank in _saved_holders(saved, wanted):
        if saved.rank(pipeline_rank=rank, dp_rank=0)["moe_layers"]:
            records = [r for r in saved.ranks if r["pipeline_rank"] == rank
                       and all(ep_dp == 0 for _, ep_dp in r["experts"].values())]
            sources = [(os.path.join(directory, f"expp_rank_{next(iter(r['experts'].values()))[0]}_mp_rank_"
                                                f"{rank:02d}_optim_states.pt"), r) for r in records]
        else:
            record = saved.rank(pipeline_rank=rank, dp_rank=0)
            sources = [(os.path.join(directory, f"mp_rank_{rank:02d}_model_states.pt"), record)]
        for path, record in sources:
            saved_state = _load(path)["optimizer"]
            for group, names in zip(saved_state["param_groups"], record["optimizer_order"]):
                for index, name in zip(group["params"], names):
                    if name not in wanted or name in state.known:
                        continue
                    state.known.add(name)
                    state.options[name] = _options(group)
                    entry = saved_state["state"].get(index)
                    if entry:
                        state.tensors[name] = {k: v for k, v in entry.items() if k != "step"}
                        state.steps[name] = entry.get("step")
    return state


def read_flat_state(directory: str, saved: Placement, wanted: dict[str, torch.Size]) -> NamedState:
    """Flat (BF16_Optimizer / ZeRO) state of ``wanted`` (name -> shape) from every data-parallel partition."""
    state = NamedState()
    prefix = "bf16_" if any(f.startswith("bf16_zero_pp_rank_") for f in os.listdir(directory)) else ""
    fragments: dict[str, list[tuple[int, dict[str, torch.Tensor]]]] = defaultdict(list)
    source: dict[str, int] = {}  # a tied weight is saved by every rank holding a copy: read the first one's
    for rank in _saved_holders(saved, set(wanted)):
        for dp_rank in range(saved.data_parallel):
            record = saved.rank(pipeline_rank=rank, dp_rank=dp_rank)
            names = ExpertNames.of_record(record)
            path = os.path.join(directory, f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{rank:02d}_optim_states.pt")
            flat = _load(path)["optimizer_state_dict"]
            base = flat["base_optimizer_state"]
            for index, mapping in enumerate(flat["param_slice_mappings"]):
                group = base["param_groups"][index]
                partition = record["experts"][group["name"]][1] if group.get("moe") else dp_rank
                group_state = base["state"].get(index, {})
                master = flat["single_partition_of_fp32_groups"][index]
                for local_name, address in mapping.items():
                    name = names.to_global(local_name)
                    if name not in wanted or source.setdefault(name, rank) != rank:
                        continue
                    span = slice(address.start, address.start + address.numel)
                    pieces = {"fp32": master[span]}
                    pieces.update({key: value[span] for key, value in group_state.items()
                                   if torch.is_tensor(value) and value.dim() == 1})
                    fragments[name].append((partition, pieces))
                    state.options[name] = _options(group)
                    state.steps[name] = group_state.get("step")
                    state.known.add(name)
    for name, parts in fragments.items():
        parts.sort(key=lambda item: item[0])
        keys = parts[0][1].keys()
        state.tensors[name] = {key: torch.cat([p[key] for _, p in parts]).reshape(wanted[name]).clone() for key in keys}
    return state


def apply_torch_state(engine, state: NamedState) -> None:
    """Load ``state`` into this engine's torch optimizer (its own ``load_state_dict`` casts and places it)."""
    optimizer = engine.optimizer
    state_dict: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for group, names in zip(optimizer.param_groups, optimizer_names(engine)):
        options = next((state.options[n] for n in names if n in state.options), _options(group))
        state_dict["param_groups"].append({**options, "params": list(range(index, index + len(names)))})
        for name in names:
            if name in state.tensors:
                entry = dict(state.tensors[name])
                if state.steps.get(name) is not None:
                    entry["step"] = state.steps[name]
                state_dict["state"][index] = entry
            index += 1
    optimizer.load_state_dict(state_dict)


def apply_flat_state(engine, state: NamedState) -> None:
    """Load ``state`` into this engine's BF16_Optimizer / ZeRO optimizer through DeepSpeed's universal loader."""
    from deepspeed.checkpoint.constants import CLIP_GRAD, DS_VERSION
    from deepspeed.git_version_info import version

    optimizer = engine.optimizer
    folder = tempfile.mkdtemp(prefix="dualpipe-reshard-")
    try:
        zero = os.path.join(folder, "zero")
        os.makedirs(zero)
        groups = []
        for group, names in zip(optimizer.optimizer.param_groups, optimizer_names(engine)):
            groups.append(next((state.options[n] for n in names if n in state.options), _options(group)))
        torch.save({"param_groups": groups, DS_VERSION: version, CLIP_GRAD: optimizer.clip_grad},
                   os.path.join(zero, "optimizer_state.pt"))
        local = {global_name: engine.param_names[p] for group in (getattr(optimizer, "bf16_groups", None)
                 or optimizer.bit16_groups) for p, global_name in zip(group, _global_names(engine, group))}
        for name, tensors in state.tensors.items():
            target = os.path.join(zero, local[name])
            os.makedirs(target)
            for key, value in tensors.items():
                torch.save({"param": value}, os.path.join(target, f"{key}.pt"))
            if state.steps.get(name) is not None:
                torch.save(state.steps[name], os.path.join(target, "step.pt"))
        optimizer.load_state_dict(state_dict_list=None, checkpoint_folder=folder, load_optimizer_states=True,
                                  load_from_fp32_weights=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    optimizer.update_lp_params()


def _global_names(engine, params) -> list[str]:
    names = ExpertNames.of_module(engine.module)
    return [names.to_global(engine.param_names[p]) for p in params]
