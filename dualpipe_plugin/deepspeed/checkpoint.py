"""DeepSpeed checkpoints that move between schedules, pipeline sizes and data-parallel sizes - or refuse to.

``save_checkpoint`` (our engine, with a schedule or deferring to TrainSchedule) writes the placement record
(:mod:`~dualpipe_plugin.deepspeed.placement_record`) and then DeepSpeed's own files, unchanged.

``load_checkpoint`` compares the checkpoint's placement with this engine's:

* the same (same layer bounds on the same ranks, same P and DP, same kind of optimizer state - e.g.
  dualpipev -> zbv, 1f1b -> TrainSchedule): DeepSpeed's own loader, bit for bit what it always did;
* different: loaded by GLOBAL parameter name. Weights: from DeepSpeed's per-layer files (named by global
  layer index already) or, for ranks with DeepSpeed MoE layers, the per-rank module files and the expert
  files, found through the record (which saving rank held each MoE module, as which local MoE index).
  Optimizer state (a full load): re-sharded by name (:mod:`~dualpipe_plugin.deepspeed.reshard`); then the LR
  scheduler, the step counters and the client state, as DeepSpeed restores them.

Everything a load needs is read and checked before anything is touched; the ranks then agree (one
``all_gather_object``): if any rank found a problem - a checkpoint without a record that cannot be matched by
name, another kind of optimizer state, fp16 state, a missing file - every rank raises the same
:class:`CheckpointPlacementError`, naming ``load_module_only=True``, and none has loaded anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dualpipe_plugin.deepspeed.config import DeepSpeedPipelineConfigError
from dualpipe_plugin.deepspeed.placement_record import (
    ExpertNames,
    Placement,
    describe_engine,
    infer_stock_placement,
    optimizer_kind,
    read_placement,
    write_placement,
)
from dualpipe_plugin.deepspeed.reshard import (
    NamedState,
    apply_flat_state,
    apply_torch_state,
    optimizer_names,
    read_flat_state,
    read_torch_state,
)

__all__ = ["CheckpointPlacementError", "current_placement", "save_placement", "load_checkpoint"]

_DEEPSPEED_STATES = ["module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                     "random_ltd"]


class CheckpointPlacementError(DeepSpeedPipelineConfigError):
    """A checkpoint cannot be loaded into this engine's placement (raised on every rank, nothing loaded)."""


def current_placement(engine, *, schedule: str, parts: list[int], stages: list[list[int]]) -> Placement:
    return Placement(schedule=schedule, pipeline_ranks=engine.num_stages,
                     data_parallel=engine.grid.get_data_parallel_world_size(), parts=tuple(parts),
                     stages=tuple(tuple(s) for s in stages), optimizer=optimizer_kind(engine.optimizer))


def save_placement(engine, save_dir: str, tag, *, schedule: str, parts: list[int], stages: list[list[int]]) -> None:
    """Every rank: its part of the record; global rank 0 writes ``<save_dir>/<tag>/dualpipe_placement.json``."""
    mine = describe_engine(engine, schedule=schedule, parts=parts, stages=stages)
    records: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(records, mine)
    if engine.global_rank == 0:
        tag = f"global_step{engine.global_steps}" if tag is None else tag
        write_placement(os.path.join(save_dir, str(tag)), records)


@dataclass
class _Plan:
    """What a by-name load will do on this rank, read and checked before anything is loaded."""

    directory: str
    saved: Placement
    main: dict = field(default_factory=dict)
    """The saving pipeline rank 0's ``mp_rank_00_model_states.pt`` (counters, scheduler, client state)."""
    module_state: dict = field(default_factory=dict)
    """This rank's whole module state by its names."""
    optimizer: NamedState | None = None


def _resolve_tag(load_dir: str, tag) -> str | None:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as handle:
        return handle.read().strip()


def _fix(full: bool) -> str:
    if not full:
        return "check the checkpoint path"
    return ("load the weights only with load_checkpoint(..., load_module_only=True) (the optimizer starts afresh), "
            "or resume with the schedule, pipeline size and data-parallel size it was saved with")


def _layer_files_for(engine, key: str) -> list[str]:
    """DeepSpeed's per-layer files that can hold module key ``key`` (a tied module is saved at one of its uses)."""
    from deepspeed.pipe import TiedLayerSpec

    head, _, rest = key.partition(".")
    if head.isdigit():
        return [f"layer_{int(head):02d}-model_states.pt"]
    if head == "tied_modules":
        tied = rest.partition(".")[0]
        return [f"layer_{i:02d}-model_states.pt" for i, spec in enumerate(engine.module._layer_specs)
                if isinstance(spec, TiedLayerSpec) and spec.key == tied]
    return []


def _module_state(engine, directory: str, saved: Placement) -> dict:
    """This rank's module state by name from a checkpoint of another placement. DeepSpeed writes a rank's
    layers in per-layer files (``layer_XX-model_states.pt``, by global index) - or, on a rank with MoE layers,
    in its ``mp_rank_XX_model_states.pt`` and the experts in expert files named by the rank's local MoE index
    and its pipeline rank, found through the record. Each key comes from wherever it was written."""
    wanted = list(engine.module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for rank in range(saved.pipeline_ranks):
        module = torch.load(os.path.join(directory, f"mp_rank_{rank:02d}_model_states.pt"), map_location="cpu",
                            weights_only=False).get("module")
        if isinstance(module, dict):
            for key in wanted:
                if key in module:
                    state.setdefault(key, module[key])
    names = ExpertNames.of_module(engine.module)
    for path in names.modules:
        holder = next(((r["pipeline_rank"], r["moe_layers"].index(path)) for r in saved.ranks
                       if path in r.get("moe_layers", [])), None)
        if holder is None:
            raise ValueError(f"no saving rank held MoE module {path!r}")
        rank, local_id = holder
        for local, global_id in enumerate(names.global_ids(path)):
            file = os.path.join(directory, f"layer_{local_id}_expert_{global_id}_mp_rank_{rank:02d}_model_states.pt")
            saved_prefix = f"{path}.deepspeed_moe.experts.deepspeed_experts.{global_id}."
            local_prefix = f"{path}.deepspeed_moe.experts.deepspeed_experts.{local}."
            for key, value in torch.load(file, map_location="cpu", weights_only=False).items():
                state[local_prefix + key[len(saved_prefix):] if key.startswith(saved_prefix) else key] = value
    layer_files: dict[str, dict | None] = {}
    for key in wanted:
        if key in state:
            continue
        for file in _layer_files_for(engine, key):
            if file not in layer_files:
                path = os.path.join(directory, file)
                layer_files[file] = (torch.load(path, map_location="cpu", weights_only=False)
                                     if os.path.isfile(path) else None)
            content, local_key = layer_files[file], key.split(".", 2 if key.startswith("tied_modules.") else 1)[-1]
            if content is not None and local_key in content:
                state[key] = content[local_key]
                break
    missing = [key for key in wanted if key not in state]
    if missing:
        raise ValueError(f"it holds no weights for {len(missing)} tensor(s) of this rank, e.g. {missing[0]!r} "
                         f"(another model?)")
    return state


def _read_optimizer(engine, plan: _Plan) -> NamedState:
    saved, current_kind = plan.saved, optimizer_kind(engine.optimizer)
    if saved.optimizer != current_kind or current_kind not in ("torch", "flat"):
        kinds = {"torch": "a torch optimizer's state (fp32 without ZeRO)",
                 "flat": "DeepSpeed's partitioned fp32 state (bf16 or ZeRO-1/2)",
                 "other": "another DeepSpeed optimizer's state (fp16)", "none": "no optimizer"}
        raise ValueError(f"its optimizer state is {kinds.get(saved.optimizer, saved.optimizer)} and this engine "
                         f"keeps {kinds.get(current_kind, current_kind)}: only the same kind can be moved by name")
    names = [name for group in optimizer_names(engine) for name in group]
    if current_kind == "torch":
        state = read_torch_state(plan.directory, saved, set(names))
        missing = [n for n in names if n not in state.known]
    else:
        shapes = {}
        lp_groups = getattr(engine.optimizer, "bf16_groups", None) or engine.optimizer.bit16_groups
        for group, group_names in zip(lp_groups, optimizer_names(engine)):
            shapes.update({name: p.shape for name, p in zip(group_names, group)})
        state = read_flat_state(plan.directory, saved, shapes)
        missing = [n for n in names if n not in state.tensors]
    if missing:
        raise ValueError(f"it holds no optimizer state for {len(missing)} parameter(s) of this rank, e.g. "
                         f"{missing[0]!r} (another model or other parameter groups)")
    return state


def _prepare(engine, directory: str, current: Placement, *, full: bool, optimizer_states: bool,
             custom_load_fn) -> tuple[bool, _Plan | None]:
    """(use DeepSpeed's own loader, or the by-name plan); raises ValueError naming the problem."""
    saved = read_placement(directory)
    if saved is None:
        saved = infer_stock_placement(directory, current=current, tensor_parallel=engine.grid.get_slice_parallel_world_size())
        if saved is None:
            return True, None  # not a checkpoint DeepSpeed can read either: its loader says so
    if saved.same_layout(current):
        return True, None
    if custom_load_fn is not None:
        raise ValueError("custom_load_fn is not supported when a checkpoint moves to another placement")
    if engine.grid.get_slice_parallel_world_size() > 1:
        raise ValueError("moving a checkpoint to another placement is not supported with tensor parallelism")
    if full and optimizer_states and not saved.recorded:
        raise ValueError(f"it was written by DeepSpeed without dualpipe_plugin (no dualpipe_placement.json) for "
                         f"{saved.describe()}, so its optimizer state cannot be matched to this engine's "
                         f"parameters by name")
    plan = _Plan(directory, saved)
    plan.main = torch.load(os.path.join(directory, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)
    plan.module_state = _module_state(engine, directory, saved)
    if full and optimizer_states and engine.optimizer is not None:
        plan.optimizer = _read_optimizer(engine, plan)
    return False, plan


def _agree(engine, problem: str | None, native: bool, directory: str, current: Placement, full: bool) -> None:
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (problem, native))
    failed = [(rank, text) for rank, (text, _) in enumerate(gathered) if text is not None]
    if failed:
        ranks = [rank for rank, _ in failed]
        raise CheckpointPlacementError(
            f"cannot load checkpoint {directory} into this engine ({current.describe()}): {failed[0][1]} "
            f"(found on global rank(s) {ranks}; nothing was loaded on any rank). Fix: {_fix(full)}"
        )
    if len({native for _, native in gathered}) > 1:
        raise CheckpointPlacementError(
            f"cannot load checkpoint {directory}: the ranks read different placement records from it (is it on a "
            f"filesystem every rank shares?); nothing was loaded on any rank"
        )


def _load_scheduler(engine, saved_state: dict | None) -> None:
    """The saved scheduler's counters; per-group lists stay this engine's (its groups were rebuilt by name)."""
    scheduler = engine.lr_scheduler
    if scheduler is None or saved_state is None:
        return
    current = scheduler.state_dict()
    merged = {key: (current[key] if isinstance(value, list) and isinstance(current.get(key), list) else value)
              for key, value in saved_state.items()}
    scheduler.load_state_dict(merged)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]


def _apply(engine, plan: _Plan, *, strict: bool, full: bool, optimizer_states: bool,
           scheduler_states: bool) -> tuple[str, dict]:
    engine.module.load_state_dict(plan.module_state, strict=strict)
    checkpoint = plan.main
    engine.loaded_checkpoint_dp_world_size = checkpoint["dp_world_size"]
    if plan.optimizer is not None:
        (apply_torch_state if optimizer_kind(engine.optimizer) == "torch" else apply_flat_state)(engine, plan.optimizer)
    elif engine.optimizer is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    states = ["module"]
    if full:
        if scheduler_states:
            _load_scheduler(engine, checkpoint.get("lr_scheduler"))
        if engine.random_ltd_enabled() and engine.random_ltd_scheduler is not None and "random_ltd" in checkpoint:
            engine.random_ltd_scheduler.load_state_dict(checkpoint["random_ltd"])
        if (engine.training_dataloader is not None and engine.curriculum_learning_enabled()
                and "data_sampler" in checkpoint):
            engine.training_dataloader.data_sampler.load_state_dict(checkpoint["data_sampler"])
        engine.global_steps = checkpoint["global_steps"]
        engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
        engine.skipped_steps = checkpoint["skipped_steps"]
        engine.loaded_checkpoint_mp_world_size = checkpoint["mp_world_size"]
        states = list(_DEEPSPEED_STATES)
    if scheduler_states:
        states.append("lr_scheduler")
    if optimizer_states:
        states.append("optimizer")
    client_state = {key: value for key, value in checkpoint.items() if key not in states}
    return os.path.join(plan.directory, "mp_rank_00_model_states.pt"), client_state


def load_checkpoint(engine, deepspeed_load: Callable, current: Placement, load_dir: str, tag=None, *, load_module_strict: bool = True, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_only: bool = False, custom_load_fn=None):
    """``engine.load_checkpoint`` (see the module docstring); ``deepspeed_load(load_dir, tag, ...)`` is
    DeepSpeed's own loader."""
    arguments = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                     load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                     custom_load_fn=custom_load_fn)
    resolved = None if engine.load_universal_checkpoint() else _resolve_tag(load_dir, tag)
    if resolved is None:
        return deepspeed_load(load_dir, tag, **arguments)  # universal checkpoints, or no 'latest': DeepSpeed's way
    directory = os.path.join(load_dir, resolved)
    full = not load_module_only
    problem, native, plan = None, True, None
    try:
        native, plan = _prepare(engine, directory, current, full=full, optimizer_states=load_optimizer_states,
                                custom_load_fn=custom_load_fn)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        problem = str(error).replace("\n", " ")
    _agree(engine, problem, native, directory, current, full)
    if native:
        return deepspeed_load(load_dir, resolved, **arguments)
    return _apply(engine, plan, strict=load_module_strict, full=full,
                  optimizer_states=load_optimizer_states and full,
                  scheduler_states=load_lr_scheduler_states and full)
