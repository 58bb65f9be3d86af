"""``bench compare``'s numbers from the measured steps: per entry the median step, per-round medians, the
ratio paired per round to its cost model's baseline and the ratio to the best peer; and the goals, each
with its value, limit and verdict."""

from __future__ import annotations

import statistics
from typing import Sequence

from dualpipe_plugin.bench.compare.entries import BASELINE, COMPUTE, MOE, Entry

__all__ = ["paired_ratios", "summarize", "evaluate_goals"]


def paired_ratios(entry_rounds: Sequence[float | None], baseline_rounds: Sequence[float | None]) -> list[float]:
    """Per round where both ran: entry median / baseline median."""
    return [a / b for a, b in zip(entry_rounds, baseline_rounds) if a is not None and b is not None and b > 0]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict]], entries: Sequence[Entry]) -> dict[str, dict]:
    """Per entry: median of all measured steps, per-round medians, paired ratio to the baseline, ratio to the
    best peer. ``runs[key]`` lists one record per round: ``{"steps_ms": [...]}`` or ``{"error": ...}``."""
    summary: dict[str, dict] = {}
    for entry in entries:
        rounds = runs.get(entry.key, [])
        per_round = [_median(r["steps_ms"]) if "steps_ms" in r else None for r in rounds]
        steps = [t for r in rounds for t in r.get("steps_ms", [])]
        summary[entry.key] = {"median_ms": _median(steps), "round_medians_ms": per_round}
    for entry in entries:
        base = summary.get(BASELINE[entry.cost_model], {}).get("round_medians_ms", [])
        ratios = paired_ratios(summary[entry.key]["round_medians_ms"], base)
        summary[entry.key]["paired_ratios"] = ratios
        summary[entry.key]["ratio_to_baseline"] = _median(ratios)
    for model in (COMPUTE, MOE):
        peers = [summary[e.key]["median_ms"] for e in entries
                 if e.cost_model == model and e.side == "peer" and summary[e.key]["median_ms"] is not None]
        best = min(peers) if peers else None
        for entry in entries:
            if entry.cost_model == model:
                value = summary[entry.key]["median_ms"]
                summary[entry.key]["ratio_to_best_peer"] = value / best if value is not None and best else None
    return summary


def _paired_to(by_key: dict, entry_key: str, peer_key: str) -> float | None:
    ratios = paired_ratios(by_key.get(entry_key, {}).get("round_medians_ms", []),
                           by_key.get(peer_key, {}).get("round_medians_ms", []))
    return _median(ratios)


def evaluate_goals(results: dict) -> list[dict]:
    """The issue's goals, each with its measured value and whether it is met (None: not measured)."""
    by_key = {e["key"]: e for e in results["entries"]}

    def ratio(key: str) -> float | None:
        return by_key.get(key, {}).get("ratio_to_baseline")

    goals = []

    def goal(what: str, value: float | None, limit: float) -> None:
        goals.append({"goal": what, "value": None if value is None else round(value, 3), "limit": limit,
                      "met": None if value is None else value <= limit})

    goal("compute: ours dualpipev / DeepSpeed TrainSchedule (paired)", ratio("ours:dualpipev"), 0.86)
    peer_ratios = [e["ratio_to_baseline"] for e in results["entries"]
                   if e["cost_model"] == COMPUTE and e["side"] == "peer" and e["key"] != BASELINE[COMPUTE]
                   and e.get("ratio_to_baseline") is not None]
    ours = ratio("ours:dualpipev")
    goals.append({"goal": "compute: ours dualpipev ahead of every peer", "value": None if ours is None else round(ours, 3),
                  "limit": None if not peer_ratios else round(min(peer_ratios), 3),
                  "met": None if ours is None or not peer_ratios else ours < min(peer_ratios)})
    overlap = "ours:dualpipev+overlap@moe"
    goal("moe: ours dualpipev + overlap / DeepSpeed TrainSchedule (paired)", ratio(overlap), 0.80)
    goal("moe: ours dualpipev + overlap / torch ScheduleDualPipeV (paired)",
         _paired_to(by_key, overlap, "torch:ScheduleDualPipeV@moe"), 0.85)
    goal("moe: ours dualpipev + overlap / DeepSpeed DualPipeVEngine (paired)",
         _paired_to(by_key, overlap, "deepspeed:DualPipeVEngine@moe"), 0.85)
    via_deepspeed = "ours:dualpipev+overlap@deepspeed@moe"
    goal("moe: ours dualpipev + overlap via DeepSpeed / DeepSpeed TrainSchedule (paired)", ratio(via_deepspeed), 0.80)
    goal("moe: ours dualpipev + overlap via DeepSpeed / DeepSpeed DualPipeVEngine (paired)",
         _paired_to(by_key, via_deepspeed, "deepspeed:DualPipeVEngine@moe"), 0.85)
    for entry in results["entries"]:
        if entry["side"] == "ours" and entry["status"] == "ok":
            goal(f"{entry['cost_model']}: {entry['label']} measured / simulated", entry.get("measured_over_simulated"),
                 1.03)
    return goals
