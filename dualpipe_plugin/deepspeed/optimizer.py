"""A pre-built optimizer, parameter groups and LR scheduler, carried through the re-partition in ``initialize``.

DeepSpeed scripts build the optimizer before ``deepspeed.initialize`` - often with parameter groups (no
weight decay on norms and biases) - and hand it over with a scheduler bound to it. A schedule that places
other layers on a rank than DeepSpeed's partition (dualpipev, dualpipe, zbv) rebuilds this rank's layers
inside ``initialize`` (:mod:`dualpipe_plugin.deepspeed.layout`), so what the script built refers to layers
that are gone. This module makes it refer to the new ones, by GLOBAL parameter name (the PipelineModule's
global layer index and the local name: ``"5.linear.bias"``, ``"tied_modules.embed.weight"``, the names
DeepSpeed's checkpoints use):

1. :func:`record_parameters`, before the rebuild: every pipeline rank lists its optimizer's groups (or the
   ``model_parameters`` it was given): each group's hyper-parameters and the global names in it; the
   ranks of a pipeline exchange the lists (one ``all_gather_object``), so every rank knows, for every
   parameter of the model, the group and hyper-parameters its builder gave it. Everything that cannot be
   followed is found here, from the exchanged lists, so every rank raises the same error.
2. :meth:`FollowedParameters.after_rebuild`: this rank's new parameters are put in the group (and with the
   hyper-parameters) their global name had. Groups keep their original order: one group per original
   group index, split only where ranks gave the same index different hyper-parameters (layer-wise
   learning rates); empty groups are left out (as DeepSpeed leaves them out).

   * A ``torch.optim.Optimizer`` (torch's or DeepSpeed's own) is kept as the same object: its
     ``param_groups`` are rewritten in place (as DeepSpeed itself re-points a client optimizer after
     AutoEP replaces modules), so the script's reference to it stays valid and a scheduler bound to it
     stays bound. Refused: an optimizer with state (it has stepped: that state belongs to parameters
     that moved), one that keeps its parameters outside ``param_groups`` (``torch.optim.LBFGS``), one
     holding tensors that are not the module's parameters.
   * ``model_parameters`` as a flat list or as a list of group dicts is rebuilt the same way (for the
     config's optimizer or a callable one).
   * An LR scheduler object bound to the optimizer keeps its state (``last_epoch``, ...). If the groups
     changed on this rank, its per-group lists follow them: ``base_lrs`` from each group's
     ``initial_lr``, ``_last_lr`` from its ``lr``, every other list of one value per group (DeepSpeed's
     ``min_lrs``/``max_lrs``, LambdaLR's ``lr_lambdas``) by the group it came from.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from dualpipe_plugin.deepspeed.agreement import first_problem_in_pipeline
from dualpipe_plugin.deepspeed.config import DeepSpeedPipelineConfigError

__all__ = ["FollowedParameters", "check_group_counts", "record_parameters"]

_NOT_OPTIONS = ("params", "param_names")


@dataclass(frozen=True)
class _Group:
    """One parameter group as its builder made it: its index, hyper-parameters and the global names in it."""

    index: int
    options: dict
    names: tuple[str, ...]
    named: bool
    """The group carried ``param_names`` (torch's named parameter groups)."""


@dataclass(frozen=True)
class _RankRecord:
    """What one pipeline rank's optimizer (or ``model_parameters``) holds, as exchanged in the pipeline."""

    rank: int
    groups: tuple[_Group, ...]
    state_entries: int
    """Parameters with optimizer state (an optimizer that has stepped)."""
    foreign: int
    """Tensors in the groups that are not parameters of the PipelineModule."""
    cache: str | None
    """An attribute of the optimizer that lists parameters besides ``param_groups``."""


@dataclass(frozen=True)
class _Source:
    """Where the parameters to follow come from: ``kind`` is "optimizer", "groups" or "flat"."""

    kind: str
    groups: list
    optimizer: Any = None
    scheduler: Any = None


def _portable(value: Any) -> Any:
    """A value that survives ``all_gather_object`` (its repr when it cannot be pickled, e.g. a lambda)."""
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any pickling failure
        return repr(value)
    return value


def _canonical(value: Any) -> Any:
    """A hashable stand-in for a hyper-parameter value (tensors by dtype and content)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.detach().cpu().flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _canonical(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _signature(options: dict) -> tuple:
    return tuple(sorted((key, _canonical(value)) for key, value in options.items()))


def _differences(a: dict, b: dict) -> str:
    """The hyper-parameters on which two groups differ, as ``key=a/b``."""
    keys = sorted(k for k in a.keys() | b.keys() if _canonical(a.get(k)) != _canonical(b.get(k)))
    return ", ".join(f"{k}={a.get(k)!r}/{b.get(k)!r}" for k in keys) or "none"


def _parameters_cached_elsewhere(optimizer: torch.optim.Optimizer, ids: set[int]) -> str | None:
    """The name of an attribute (other than param_groups/state) that holds some of the module's parameters."""
    for attribute, value in vars(optimizer).items():
        if attribute in ("param_groups", "state", "defaults"):
            continue
        items: Iterable = ()
        if isinstance(value, (list, tuple, set)):
            items = value
        elif isinstance(value, dict):
            items = list(value.keys()) + list(value.values())
        if any(isinstance(item, torch.Tensor) and id(item) in ids for item in items):
            return attribute
    return None


def _source(arguments: dict) -> _Source | None:
    optimizer = arguments.get("optimizer")
    scheduler = arguments.get("lr_scheduler")
    if isinstance(optimizer, torch.optim.Optimizer):
        return _Source("optimizer", optimizer.param_groups, optimizer, scheduler)
    given = arguments.get("model_parameters")
    if given is None:
        return None
    given = list(given)
    if given and all(isinstance(item, dict) for item in given):
        return _Source("groups", given, None, scheduler)
    if any(isinstance(item, dict) for item in given):
        raise DeepSpeedPipelineConfigError(
            "model_parameters mixes parameter-group dicts and tensors; pass either a list of tensors or a list "
            "of dicts {'params': [...], ...}"
        )
    return _Source("flat", [{"params": given}], None, scheduler)


def _own_record(rank: int, source: _Source, names_by_id: dict[int, str]) -> _RankRecord:
    groups, foreign = [], 0
    for index, group in enumerate(source.groups):
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = []
        for param in params:
            name = names_by_id.get(id(param))
            if name is None:
                foreign += 1
            else:
                names.append(name)
        options = {k: _portable(v) for k, v in group.items() if k not in _NOT_OPTIONS}
        groups.append(_Group(index, options, tuple(names), "param_names" in group))
    state_entries, cache = 0, None
    if source.optimizer is not None:
        state_entries = sum(1 for value in source.optimizer.state.values() if value)
        cache = _parameters_cached_elsewhere(source.optimizer, set(names_by_id))
    return _RankRecord(rank, tuple(groups), state_entries, foreign, cache)


def _what(source: _Source) -> str:
    return {
        "optimizer": "the optimizer passed to deepspeed.initialize",
        "groups": "the parameter groups passed as model_parameters",
        "flat": "model_parameters",
    }[source.kind]


def _check_records(records: list[_RankRecord], source: _Source, schedule: str) -> dict[str, tuple[_Group, int]]:
    """The errors every rank finds alike; returns global name -> (its group, the pipeline rank it came from)."""
    head = f"pipeline.schedule={schedule!r} moves layers between pipeline ranks inside deepspeed.initialize"
    stepped = [r for r in records if r.state_entries]
    if stepped:
        counts = ", ".join(f"rank {r.rank}: {r.state_entries}" for r in stepped)
        raise DeepSpeedPipelineConfigError(
            f"{head}, but {_what(source)} already holds optimizer state ({counts} parameter(s)): it has stepped, "
            f"and that state belongs to parameters that move. Pass a freshly built optimizer (or a callable, "
            f"optimizer=lambda params: ...) and restore training state with engine.load_checkpoint"
        )
    cached = [r for r in records if r.cache]
    if cached:
        raise DeepSpeedPipelineConfigError(
            f"{head}, but {_what(source)} ({type(source.optimizer).__name__}) also keeps its parameters in "
            f"optimizer.{cached[0].cache}, outside param_groups, so it cannot be moved to the new layers; pass "
            f"a callable instead: optimizer=lambda params: {type(source.optimizer).__name__}(params, ...)"
        )
    foreign = [r for r in records if r.foreign]
    if foreign:
        counts = ", ".join(f"rank {r.rank}: {r.foreign}" for r in foreign)
        raise DeepSpeedPipelineConfigError(
            f"{head}, but {_what(source)} holds tensors that are not parameters of the PipelineModule "
            f"({counts}); only the module's parameters can follow the layers: optimize other tensors with an "
            f"optimizer of their own, or leave out \"schedule\""
        )
    found: dict[str, tuple[_Group, int]] = {}
    for record in records:
        for group in record.groups:
            for name in group.names:
                earlier = found.get(name)
                if earlier is None:
                    found[name] = (group, record.rank)
                    continue
                other, rank = earlier
                if other.index != group.index or _signature(other.options) != _signature(group.options):
                    raise DeepSpeedPipelineConfigError(
                        f"{head}, and parameter {name!r} (held by more than one rank: a tied weight) is in "
                        f"parameter group {other.index} on pipeline rank {rank} but in group {group.index} on "
                        f"pipeline rank {record.rank} (differing: {_differences(other.options, group.options)}); "
                        f"build the groups with the same rule on every rank"
                    )
    return found


class FollowedParameters:
    """The exchanged parameter groups of a pipeline: applied to the re-partitioned module by :meth:`after_rebuild`."""

    def __init__(self, source: _Source, found: dict[str, tuple[_Group, int]], mine: _RankRecord, schedule: str,
                 group: Any = None):
        self._source = source
        self._found = found
        self._mine = mine
        self._schedule = schedule
        self._group = group  # the pipeline's process group: a refusal on one rank is raised on all

    def after_rebuild(self, module: torch.nn.Module) -> dict:
        """Point the optimizer (or model_parameters) at ``module``'s new parameters; returns the
        ``deepspeed.initialize`` arguments to replace. A refusal on any rank of the pipeline is raised on
        every rank (:func:`~dualpipe_plugin.deepspeed.agreement.first_problem_in_pipeline`)."""
        try:
            arguments, problem = self._follow(module), None
        except DeepSpeedPipelineConfigError as error:
            arguments, problem = None, f"pipeline rank {self._mine.rank}: {error}"
        first = first_problem_in_pipeline(problem, self._group)
        if first is not None:
            raise DeepSpeedPipelineConfigError(first)
        return arguments

    def _follow(self, module: torch.nn.Module) -> dict:
        keys: list[tuple[int, tuple]] = []
        groups: dict[tuple[int, tuple], dict] = {}
        for name, param in module.named_parameters():
            entry = self._found.get(name)
            if entry is None:
                continue  # its builder did not optimize it
            group, _ = entry
            key = (group.index, _signature(group.options))
            if key not in groups:
                keys.append(key)
                groups[key] = {**group.options, "params": []}
                if group.named:
                    groups[key]["param_names"] = []
            groups[key]["params"].append(param)
            if group.named:
                groups[key]["param_names"].append(name)
        keys.sort(key=lambda k: k[0])  # original group order; a split group's parts in order of appearance
        new_groups = [groups[key] for key in keys]
        kind = self._source.kind
        if kind == "flat":
            return {"model_parameters": new_groups[0]["params"] if new_groups else []}
        if kind == "groups":
            return {"model_parameters": new_groups}
        optimizer = self._source.optimizer
        old_keys = [(g.index, _signature(g.options)) for g in self._mine.groups]
        optimizer.param_groups[:] = []
        for group in new_groups:
            optimizer.add_param_group(group)
        if self._source.scheduler is not None and not callable(self._source.scheduler) and keys != old_keys:
            _follow_scheduler(self._source.scheduler, optimizer, [k[0] for k in keys], len(old_keys), self._schedule)
        return {"model_parameters": None}  # DeepSpeed takes a client optimizer as it is


def _schedulers(scheduler) -> list:
    """The scheduler and those it chains (SequentialLR, ChainedScheduler)."""
    found = [scheduler]
    for inner in getattr(scheduler, "_schedulers", None) or []:
        found += _schedulers(inner)
    return found


def _bound_to(scheduler, optimizer) -> bool:
    bound = getattr(scheduler, "optimizer", None)
    return bound is optimizer or getattr(bound, "optimizer", None) is optimizer


def _follow_scheduler(scheduler, optimizer, origins: list[int], old_count: int, schedule: str) -> None:
    """Re-index the scheduler's per-group lists for the optimizer's new groups (see the module docstring)."""
    for inner in _schedulers(scheduler):
        if not _bound_to(inner, optimizer):
            continue
        for attribute, value in list(vars(inner).items()):
            if not isinstance(value, (list, tuple)) or len(value) != old_count or old_count == 0:
                continue
            if attribute == "base_lrs":
                new = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
            elif attribute == "_last_lr":
                new = [group["lr"] for group in optimizer.param_groups]
            else:
                missing = sorted({i for i in origins if i >= old_count})
                if missing:
                    raise DeepSpeedPipelineConfigError(
                        f"pipeline.schedule={schedule!r} moves layers between pipeline ranks inside "
                        f"deepspeed.initialize; this rank now holds parameters of group(s) {missing}, which its "
                        f"LR scheduler ({type(inner).__name__}, {attribute}: {len(value)} value(s)) has no entry "
                        f"for: build the same parameter groups on every rank (an empty group is fine), or pass "
                        f"the scheduler as a callable: lr_scheduler=lambda optimizer: ..."
                    )
                new = [value[i] for i in origins]
            setattr(inner, attribute, type(value)(new))


def record_parameters(model, arguments: dict, schedule: str) -> FollowedParameters | None:
    """Before the re-partition (a collective over this rank's pipeline): what :class:`FollowedParameters`
    needs, or None when DeepSpeed is to take the module's parameters as they are."""
    source = _source(arguments)
    if source is None:
        return None
    if source.kind != "optimizer":
        arguments["model_parameters"] = source.groups if source.kind == "groups" else source.groups[0]["params"]
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    grid = model._grid
    mine = _own_record(grid.get_stage_id(), source, names_by_id)
    records: list[Any] = [None] * grid.get_pipe_parallel_world_size()
    torch.distributed.all_gather_object(records, mine, group=grid.get_pipe_parallel_group())
    found = _check_records(records, source, schedule)
    return FollowedParameters(source, found, mine, schedule, grid.get_pipe_parallel_group())


def check_group_counts(engine, schedule: str) -> None:
    """After ``initialize``: refuse a ZeRO optimizer whose pipeline ranks have different numbers of groups.

    DeepSpeed's ZeRO-1/2 optimizer computes the gradient norm group by group, each with a collective over
    the pipeline (its model-parallel group), so every rank of a pipeline must have as many groups. A
    placement can break that where DeepSpeed's partition did not - DeepSpeed MoE expert groups exist only on
    ranks holding MoE layers, a layer-wise group splits on the rank that holds layers of two stages - and
    the first step would hang. Raised on every rank (one ``all_gather_object``)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = isinstance(engine.optimizer, DeepSpeedZeroOptimizer)
    mine = (engine.grid.get_data_parallel_id(), engine.stage_id, len(engine.optimizer.bit16_groups) if zero else 0)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (zero, mine))
    if not any(flag for flag, _ in gathered):
        return
    counts: dict[int, dict[int, int]] = {}
    for _, (dp_id, stage, count) in gathered:
        counts.setdefault(dp_id, {})[stage] = count
    for per_stage in counts.values():
        if len(set(per_stage.values())) > 1:
            shown = ", ".join(f"rank {stage}: {count}" for stage, count in sorted(per_stage.items()))
            raise DeepSpeedPipelineConfigError(
                f"pipeline.schedule={schedule!r} gives the pipeline ranks different numbers of optimizer parameter "
                f"groups ({shown}; e.g. DeepSpeed MoE expert groups exist only on ranks holding MoE layers, a "
                f"layer-wise group splits on a rank holding layers of two stages), and DeepSpeed's ZeRO optimizer "
                f"computes the gradient norm group by group with a collective over the pipeline: the first step "
                f"would hang. Place the layers so every rank gets the same groups under this schedule (for MoE: "
                f"MoE layers on every rank, e.g. partition_method=\"type:<block class>\"), or use ZeRO stage 0, or "
                f"bf16 with \"data_types\": {{\"grad_accum_dtype\": \"fp32\"}} (DeepSpeed's BF16_Optimizer)"
            )
