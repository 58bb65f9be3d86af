"""``bench compare``'s entries: what is compared (ours and the peers, per cost model), the baseline every
ratio of a cost model is paired to, choosing a subset, and whether an entry can run here."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from typing import Any, Sequence

__all__ = ["COMPUTE", "MOE", "BASELINE", "Entry", "entries_for", "select", "availability"]

COMPUTE, MOE = "compute", "moe"
BASELINE = {COMPUTE: "deepspeed:TrainSchedule", MOE: "deepspeed:TrainSchedule@moe"}


@dataclass(frozen=True)
class Entry:
    key: str
    """Stable id, e.g. ``ours:dualpipev``, ``torch:ScheduleZBVZeroBubble@moe``."""
    label: str
    side: str
    """``ours`` or ``peer``."""
    cost_model: str
    target: str
    """``module:function`` run on every rank: ``fn(rank, world_size, Job) -> RankReport``."""
    options: tuple[tuple[str, Any], ...] = ()
    simulate: tuple[str, str] | None = None
    """(our schedule to simulate, how the entry pays the backward): ``split`` (I and W apart), ``no-split``
    (every backward a full B, W=0: DeepSpeed, torch's I carrying the W sleep), ``torch-order`` (torch's
    own action order, converted, I=B and W=0), ``overlap`` (MoE, F&B pairs perfectly overlapped)."""
    requires: tuple[str, ...] = ()
    """Modules that must be importable, else the entry is reported as not available."""


_W = "dualpipe_plugin.bench.workload"
_T = "dualpipe_plugin.bench.peers_torch:run_torch_rank"
_D = "dualpipe_plugin.bench.peers_deepspeed:run_deepspeed_rank"
_M = "dualpipe_plugin.bench.peers_megatron:run_megatron_rank"


def entries_for(quick: bool) -> list[Entry]:
    """Every entry in run order (full mode adds ours dualpipev without overlap on the MoE model)."""
    from dualpipe_plugin.schedules import schedule_names

    ours = [
        Entry(f"ours:{s}", f"ours {s}", "ours", COMPUTE, f"{_W}:run_ours_rank", (("schedule", s),), (s, "split"))
        for s in schedule_names()
    ]
    ours += [
        Entry("ours:dualpipev@deepspeed", "ours dualpipev via DeepSpeed", "ours", COMPUTE, _D,
              (("engine", "ours"), ("schedule", "dualpipev")), ("dualpipev", "split"),
              ("deepspeed", "dualpipe_plugin.deepspeed")),
        Entry("ours:dualpipev@megatron", "ours dualpipev via Megatron-Core", "ours", COMPUTE, _M,
              (("schedule", "ours"), ("ours", "dualpipev")), ("dualpipev", "split"),
              ("megatron.core", "dualpipe_plugin.megatron.schedule_fn")),
    ]
    peers = [
        Entry("torch:ScheduleDualPipeV", "torch ScheduleDualPipeV", "peer", COMPUTE, _T, (("schedule", "dualpipev"),),
              ("dualpipev", "torch-order")),
        Entry("torch:Schedule1F1B", "torch Schedule1F1B", "peer", COMPUTE, _T, (("schedule", "1f1b"),),
              ("1f1b", "no-split")),
        Entry("torch:ScheduleZBVZeroBubble", "torch ScheduleZBVZeroBubble", "peer", COMPUTE, _T,
              (("schedule", "zbv"),), ("dualpipev", "torch-order")),
        Entry(BASELINE[COMPUTE], "DeepSpeed TrainSchedule", "peer", COMPUTE, _D, (("engine", "train_schedule"),),
              ("1f1b", "no-split"), ("deepspeed",)),
        Entry("deepspeed:DualPipeVEngine", "DeepSpeed DualPipeVEngine", "peer", COMPUTE, _D,
              (("engine", "dualpipev_engine"),), ("dualpipev", "no-split"), ("deepspeed",)),
        Entry("megatron:1F1B", "Megatron-Core 1F1B", "peer", COMPUTE, _M, (("schedule", "1f1b"),),
              ("1f1b", "no-split"), ("megatron.core",)),
        Entry("megatron:interleaved", "Megatron-Core interleaved (VP=2)", "peer", COMPUTE, _M,
              (("schedule", "interleaved"),), None, ("megatron.core",)),
    ]
    moe = [
        Entry("ours:dualpipev+overlap@moe", "ours dualpipev + overlap", "ours", MOE, f"{_W}:run_ours_moe_rank",
              (("schedule", "dualpipev"), ("overlap", True)), ("dualpipev", "overlap")),
    ]
    moe.append(Entry("ours:dualpipev+overlap@deepspeed@moe", "ours dualpipev + overlap via DeepSpeed", "ours", MOE,
                     _D, (("engine", "ours"), ("schedule", "dualpipev"), ("overlap", True)), ("dualpipev", "overlap"),
                     ("deepspeed", "dualpipe_plugin.deepspeed")))
    if not quick:
        moe.append(Entry("ours:dualpipev@moe", "ours dualpipev, overlap off", "ours", MOE, f"{_W}:run_ours_moe_rank",
                         (("schedule", "dualpipev"), ("overlap", False)), ("dualpipev", "split")))
    moe += [
        Entry("torch:ScheduleDualPipeV@moe", "torch ScheduleDualPipeV", "peer", MOE, _T, (("schedule", "dualpipev"),),
              ("dualpipev", "torch-order")),
        Entry(BASELINE[MOE], "DeepSpeed TrainSchedule", "peer", MOE, _D, (("engine", "train_schedule"),),
              ("1f1b", "no-split"), ("deepspeed",)),
        Entry("deepspeed:DualPipeVEngine@moe", "DeepSpeed DualPipeVEngine", "peer", MOE, _D,
              (("engine", "dualpipev_engine"),), ("dualpipev", "no-split"), ("deepspeed",)),
    ]
    return ours + peers + moe


def select(entries: Sequence[Entry], only: Sequence[str]) -> list[Entry]:
    """The entries whose key is in ``only`` (all when empty), plus the baseline of each cost model they use
    (every ratio is paired to it)."""
    if not only:
        return list(entries)
    unknown = set(only) - {e.key for e in entries}
    if unknown:
        raise ValueError(f"unknown bench compare entries {sorted(unknown)}; valid: {', '.join(e.key for e in entries)}")
    chosen = set(only)
    models = {e.cost_model for e in entries if e.key in chosen}
    return [e for e in entries if e.key in chosen or (e.cost_model in models and e.key == BASELINE[e.cost_model])]


def availability(entry: Entry) -> str | None:
    """None when the entry can run here, else why not."""
    for module in entry.requires:
        try:
            if module.startswith("dualpipe_plugin."):
                import_module(module)
            elif find_spec(module) is None:
                return f"{module} is not installed"
        except Exception as error:  # noqa: BLE001 - any import failure makes the entry unavailable
            return f"import {module} failed: {type(error).__name__}: {error}"
    return None
