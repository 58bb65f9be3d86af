"""``bench compare``'s bar chart: the paired ratio to DeepSpeed TrainSchedule per entry, one panel per cost
model, the goals as lines."""

from __future__ import annotations

from pathlib import Path

from dualpipe_plugin.bench.compare.entries import COMPUTE, MOE

__all__ = ["bar_chart"]


def bar_chart(results: dict, path: str | Path) -> None:
    """Paired ratio to DeepSpeed TrainSchedule per entry, one panel per cost model, goals as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in (COMPUTE, MOE) if any(e["cost_model"] == m for e in results["entries"])]
    heights = [sum(1 for e in results["entries"] if e["cost_model"] == m) for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 0.42 * sum(heights) + 1.6 * len(models)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    goals = {COMPUTE: [(0.86, "goal 0.86")], MOE: [(0.80, "goal 0.80")]}
    for ax, model in zip(axes[:, 0], models):
        rows = [e for e in results["entries"] if e["cost_model"] == model]
        labels = [e["label"] + ("" if e["status"] == "ok" else f" ({e['status']})") for e in rows]
        values = [e.get("ratio_to_baseline") or 0.0 for e in rows]
        colors = ["#d95f02" if e["side"] == "ours" else "#7570b3" for e in rows]
        ax.barh(range(len(rows)), values, color=colors)
        for i, v in enumerate(values):
            if v:
                ax.text(v + 0.005, i, f"{v:.3f}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        for x, text in goals[model]:
            ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
            ax.text(x + 0.004, len(rows) - 0.6, text, fontsize=7, ha="left")
        ax.axvline(1.0, color="grey", linewidth=0.6)
        ax.set_xlim(0.5, max([1.1] + [v + 0.08 for v in values]))
        ax.set_title({COMPUTE: "pure compute", MOE: "MoE, EP=2 (8 processes)"}[model], fontsize=10)
        ax.set_xlabel("step time / DeepSpeed TrainSchedule (paired, median over rounds; lower is better)",
                      fontsize=8)
    fig.suptitle("bench compare: emulated device, P=4, C=16 (orange: ours)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
