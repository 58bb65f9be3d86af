"""``dualpipe_placement.json``: the schedule, P, DP and layer placement a DeepSpeed checkpoint was written with.

Our engine (with a schedule, or deferring to DeepSpeed's TrainSchedule) writes this small file next to
DeepSpeed's own files in ``<save_dir>/<tag>/`` before DeepSpeed writes them, so a checkpoint whose
``latest`` names it always has it. It holds what DeepSpeed's files leave out and a loader needs to move
a checkpoint between schedules, pipeline sizes and data-parallel sizes by GLOBAL parameter name::

    {"format": 1, "schedule": "dualpipev", "pipeline_ranks": 2, "data_parallel": 2,
     "parts": [0, 2, 4, 6, 8],            # layer-spec bounds of the placement's stages
     "stages": [[0, 3], [1, 2]],          # per pipeline rank: the stage of each chunk
     "optimizer": "torch",                # torch | flat (BF16_Optimizer, ZeRO-1/2) | other (FP16_Optimizer, ...)
     "ranks": [{"global_rank": 0, "pipeline_rank": 0, "dp_rank": 0,
                "experts": {"ep_size_2": [ep_rank, expert_dp_rank]},
                "moe_layers": ["1.moe", "7.moe"],            # MoE modules in the order DeepSpeed numbers them
                "optimizer_order": [["0.fc.weight", ...], ...]}, ...]}   # per group, global names

``optimizer_order`` is what a torch optimizer's state dict (indices, not names) needs to be read by name;
``moe_layers`` and ``experts`` are what DeepSpeed's expert files (named by local MoE index, pipeline rank and
expert id) and expert parameter names (local expert index) need. A checkpoint without the file was
written by DeepSpeed itself (no plugin): :func:`infer_stock_placement` describes what it can of it.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

import torch

__all__ = [
    "PLACEMENT_FILE", "FORMAT", "Placement", "describe_engine", "write_placement", "read_placement",
    "infer_stock_placement", "optimizer_kind", "ExpertNames",
]

PLACEMENT_FILE = "dualpipe_placement.json"
FORMAT = 1
_EXPERT = re.compile(r"^(?P<module>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint's (or an engine's) parameters live; see the module docstring for the fields."""

    schedule: str
    pipeline_ranks: int
    data_parallel: int
    parts: tuple[int, ...]
    stages: tuple[tuple[int, ...], ...]
    optimizer: str
    ranks: tuple[dict, ...] = field(default=(), compare=False)
    recorded: bool = field(default=True, compare=False)
    """False for a checkpoint DeepSpeed wrote without the plugin (inferred, see :func:`infer_stock_placement`)."""

    def same_layout(self, other: "Placement") -> bool:
        """Every parameter (and optimizer partition) is where ``other`` has it: DeepSpeed's own loader fits."""
        return (self.pipeline_ranks, self.data_parallel, self.parts, self.stages, self.optimizer) == (
            other.pipeline_ranks, other.data_parallel, other.parts, other.stages, other.optimizer)

    def rank(self, *, pipeline_rank: int, dp_rank: int | None = None, ep: tuple[str, int, int] | None = None) -> dict:
        """The record of one saving rank: by data-parallel rank, or by (group name, ep rank, expert-dp rank)."""
        for record in self.ranks:
            if record["pipeline_rank"] != pipeline_rank:
                continue
            if dp_rank is not None and record["dp_rank"] == dp_rank:
                return record
            if ep is not None and record["experts"].get(ep[0]) == [ep[1], ep[2]]:
                return record
        raise KeyError(f"no rank record for pipeline rank {pipeline_rank}, dp {dp_rank}, experts {ep}")

    def describe(self) -> str:
        return (f"schedule {self.schedule!r}, {self.pipeline_ranks} pipeline rank(s) x {self.data_parallel} "
                f"data-parallel, stages per rank {[list(s) for s in self.stages]} over layer bounds {list(self.parts)}")


class ExpertNames:
    """Local <-> global names of DeepSpeed MoE expert parameters on one rank.

    DeepSpeed names a rank's experts by LOCAL index (``<module>.deepspeed_moe.experts.deepspeed_experts.1.w``);
    its checkpoints use the GLOBAL expert id (ep_rank x local experts + local index).
    """

    def __init__(self, modules: dict[str, tuple[int, int]]):
        self._modules = modules
        """MoE module path -> (this rank's ep rank, local experts)."""

    @classmethod
    def of_module(cls, module) -> "ExpertNames":
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups

        found = {}
        for path, sub in module.named_modules():
            if isinstance(sub, MoE):
                found[path] = (groups._get_expert_parallel_rank(sub.expert_group_name), sub.num_local_experts)
        return cls(found)

    @classmethod
    def of_record(cls, record: dict) -> "ExpertNames":
        """A saving rank's naming, from its placement record."""
        groups = record.get("moe_groups", {})
        return cls({path: (record["experts"][group][0], record["moe_local_experts"][path])
                    for path, group in groups.items()})

    def to_global(self, name: str) -> str:
        match = _EXPERT.match(name)
        if match is None or match["module"] not in self._modules:
            return name
        ep_rank, local = self._modules[match["module"]]
        index = ep_rank * local + int(match["index"])
        return f"{match['module']}.deepspeed_moe.experts.deepspeed_experts.{index}.{match['rest']}"

    def global_ids(self, path: str) -> list[int]:
        ep_rank, local = self._modules[path]
        return [ep_rank * local + j for j in range(local)]

    @property
    def modules(self) -> list[str]:
        return list(self._modules)


def optimizer_kind(optimizer) -> str:
    """How a DeepSpeed optimizer saves its state: "torch" (a torch optimizer's state dict, by index),
    "flat" (BF16_Optimizer / ZeRO-1/2: flat fp32 partitions with name -> fragment maps), or "other"."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if optimizer is None:
        return "none"
    if isinstance(optimizer, (BF16_Optimizer, DeepSpeedZeroOptimizer)):
        return "flat"
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch"
    return "other"


def describe_engine(engine, *, schedule: str, parts: list[int], stages: list[list[int]]) -> dict:
    """This rank's part of the record (gathered on every rank, written by global rank 0)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    names = ExpertNames.of_module(engine.module)
    order = []
    if optimizer_kind(engine.optimizer) == "torch":
        by_param = engine.param_names
        order = [[names.to_global(by_param[p]) for p in group["params"]] for group in engine.optimizer.param_groups]
    moe_groups = {path: sub.expert_group_name for path, sub in engine.module.named_modules() if isinstance(sub, MoE)}
    experts = {group: [groups._get_expert_parallel_rank(group), groups._get_expert_data_parallel_rank(group)]
               for group in sorted(set(moe_groups.values()))}
    return {
        "global_rank": engine.global_rank,
        "pipeline_rank": engine.stage_id,
        "dp_rank": engine.grid.get_data_parallel_id(),
        "experts": experts,
        "moe_layers": list(moe_groups),
        "moe_groups": moe_groups,
        "moe_local_experts": {path: sub.num_local_experts for path, sub in engine.module.named_modules()
                              if isinstance(sub, MoE)},
        "optimizer_order": order,
        "header": {"schedule": schedule, "pipeline_ranks": engine.num_stages,
                   "data_parallel": engine.grid.get_data_parallel_world_size(), "parts": list(parts),
                   "stages": [list(s) for s in stages], "optimizer": optimizer_kind(engine.optimizer)},
    }


def write_placement(directory: str, records: list[dict]) -> None:
    header = records[0]["header"]
    document = {"format": FORMAT, **header,
                "ranks": [{k: v for k, v in r.items() if k != "header"} for r in records]}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PLACEMENT_FILE)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(document, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _placement(document: dict, recorded: bool) -> Placement:
    return Placement(
        schedule=document["schedule"], pipeline_ranks=int(document["pipeline_ranks"]),
        data_parallel=int(document["data_parallel"]), parts=tuple(document["parts"]),
        stages=tuple(tuple(s) for s in document["stages"]), optimizer=document["optimizer"],
        ranks=tuple(document.get("ranks", ())), recorded=recorded,
    )


def read_placement(directory: str) -> Placement | None:
    """The recorded placement of the checkpoint in ``directory``; None if it has no record.

    Raises ValueError (one line) for a record that is damaged or of an unknown format."""
    path = os.path.join(directory, PLACEMENT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            document = json.load(handle)
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, this dualpipe_plugin reads format {FORMAT}")
        return _placement(document, True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is damaged or not written by this dualpipe_plugin ({error}); load the checkpoint "
                         f"with the schedule it was saved with, or restore the file") from None


def infer_stock_placement(directory: str, *, current: Placement, tensor_parallel: int) -> Placement | None:
    """What a checkpoint written by DeepSpeed's own PipelineEngine (no record) must be: TrainSchedule on as
    many pipeline ranks as it has ``mp_rank_*`` files, each holding its own stage. Its layer bounds are
    taken to be ``current``'s when ``current`` is DeepSpeed's placement on as many ranks (the same model
    and partition method), and unknown otherwise. None if the directory holds no such files."""
    files = sorted(glob.glob(os.path.join(directory, "mp_rank_*_model_states.pt")))
    if not files:
        return None
    pipeline_ranks = max(1, len(files) // max(1, tensor_parallel))
    ranks, data_parallel = [], 1
    for stage, path in enumerate(files[:pipeline_ranks]):
        state = torch.load(path, map_location="cpu", weights_only=False)
        data_parallel = int(state.get("dp_world_size", data_parallel))
        module = state.get("module")
        moe = [key[: -len(".deepspeed_moe.gate.wg.weight")] for key in module
               if key.endswith(".deepspeed_moe.gate.wg.weight")] if isinstance(module, dict) else []
        ranks.append({"pipeline_rank": stage, "dp_rank": 0, "experts": {}, "moe_layers": moe,
                      "optimizer_order": []})
    if glob.glob(os.path.join(directory, "*zero_pp_rank_*_optim_states.pt")):
        optimizer = "flat"
    else:
        optimizer = current.optimizer if current.optimizer in ("torch", "other") else "torch"
    stages = tuple((s,) for s in range(pipeline_ranks))
    parts = current.parts if (current.stages == stages) else ()
    return Placement(schedule="deepspeed", pipeline_ranks=pipeline_ranks, data_parallel=data_parallel,
                     parts=parts, stages=stages, optimizer=optimizer, ranks=tuple(ranks), recorded=False)
