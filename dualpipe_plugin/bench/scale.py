"""Simulated bubble fraction of the four schedules for P up to 64 ranks and C = 2P, 4P, 8P micro-batches.

``python -m dualpipe_plugin.bench.scale [--out-dir benchmarks/results]`` writes ``scale.json`` and
``scale_bubble.png``; ``bench compare`` (full mode) runs it too. Pure schedule layer, a few seconds.

Costs are per 1/P of the model, the same model for every schedule: F=1, B=2, W=1 per 1/P, so a dualpipev
chunk (1/(2P) of the model) costs half of that and a dualpipe chunk (1/P, held twice) the full amount. An
F&B pair costs F+B (no overlap gain) or, for the rows with ``pair = 0.75``, 0.75·(F+B): what hiding an
MoE all-to-all behind the other chunk's compute buys (``bench overlap`` measures 0.69 on this box). The bubble fraction is the share of all rank-time
spent idle (:attr:`~dualpipe_plugin.schedules.SimResult.bubble_fraction`); peak activations are in
micro-batch activations of 1/P of the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dualpipe_plugin.schedules import SCHEDULES as REGISTERED
from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

__all__ = ["RANKS", "MULTIPLES", "SCHEDULES", "scale_table", "run_scale"]

RANKS = (2, 4, 8, 16, 32, 64)
MULTIPLES = (2, 4, 8)
SCHEDULES = tuple(REGISTERED)
PAIRED = tuple(name for name, spec in REGISTERED.items() if spec.runs_pairs)
"""Schedules with F&B pairs: also simulated with an overlapped pair."""
PAIR_RATIOS = (1.0, 0.75)


def _costs(schedule: str, ranks: int, microbatches: int, pair: float) -> tuple[CostModel, float]:
    """The chunk costs of ``schedule`` and the fraction of 1/P of the model one chunk holds."""
    stages = build_schedule(schedule, ranks, microbatches).placement.num_stages
    share = ranks / stages
    return CostModel(F=share, B=2 * share, W=share, FB=pair * 3 * share), share


def scale_table(ranks_grid: tuple[int, ...] = RANKS, multiples: tuple[int, ...] = MULTIPLES) -> list[dict]:
    """One row per (schedule, pair cost, P, C = multiple·P)."""
    rows = []
    for schedule in SCHEDULES:
        for pair in PAIR_RATIOS if schedule in PAIRED else PAIR_RATIOS[:1]:
            for ranks in ranks_grid:
                for multiple in multiples:
                    microbatches = multiple * ranks
                    costs, share = _costs(schedule, ranks, microbatches, pair)
                    result = simulate(build_schedule(schedule, ranks, microbatches), costs)
                    rows.append({
                        "schedule": schedule, "pair": pair, "ranks": ranks, "microbatches": microbatches,
                        "bubble_fraction": round(result.bubble_fraction, 5),
                        "makespan": round(result.makespan, 3),
                        "ideal": microbatches * 3.0,
                        "peak_activations": round(max(result.peak_activations_per_rank) * share, 2),
                    })
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = ("#1b9e77", "#7570b3", "#e7298a", "#d95f02", "#66a61e", "#e6ab02", "#a6761d")
    colors = {schedule: palette[index % len(palette)] for index, schedule in enumerate(SCHEDULES)}
    fig, axes = plt.subplots(1, len(MULTIPLES) + 1, figsize=(4 * (len(MULTIPLES) + 1), 3.6))
    def lines(ax, keep, x):
        for schedule in SCHEDULES:
            for pair in PAIR_RATIOS:
                mine = [r for r in rows if r["schedule"] == schedule and r["pair"] == pair and keep(r)]
                if mine:
                    # zb1p coincides with dualpipev when F&B = F+B: drawn wide and dotted underneath
                    wide = schedule == "zb1p"
                    ax.plot([r[x] for r in mine], [r["bubble_fraction"] for r in mine], marker="o", markersize=3,
                            color=colors[schedule], linestyle=":" if wide else "-" if pair == 1.0 else "--",
                            linewidth=4 if wide else 1.5, zorder=1 if wide else 2,
                            label=schedule if pair == 1.0 else f"{schedule}, F&B = {pair}(F+B)")

    for ax, multiple in zip(axes, MULTIPLES):
        lines(ax, lambda r: r["microbatches"] == multiple * r["ranks"], "ranks")
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS, [str(p) for p in RANKS])
        ax.set_title(f"C = {multiple}P", fontsize=10)
        ax.set_xlabel("pipeline ranks P")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("simulated bubble fraction")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    lines(ax, lambda r: r["ranks"] == 16, "microbatches")
    ax.set_xscale("log", base=2)
    ax.set_xticks([16 * m for m in MULTIPLES], [str(16 * m) for m in MULTIPLES])
    ax.set_title("P = 16, by micro-batches C", fontsize=10)
    ax.set_xlabel("micro-batches C")
    ax.grid(alpha=0.3)
    fig.suptitle("bubble vs P and C (simulated; per 1/P of the model F=1, B=2, W=1; dashed: overlapped F&B pairs)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_scale(out_dir: str | Path) -> dict:
    """Write ``scale.json`` and ``scale_bubble.png`` under ``out_dir``; return the JSON object."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    rows = scale_table()
    result = {
        "benchmark": "scale",
        "what": "simulated bubble fraction (idle share of all rank-time) and peak activations (1/P units)",
        "costs_per_1_over_P_of_the_model": {"F": 1, "B": 2, "W": 1, "FB": "pair * (F+B)"},
        "pair_ratios": list(PAIR_RATIOS),
        "ranks": list(RANKS), "microbatch_multiples": list(MULTIPLES), "schedules": list(SCHEDULES),
        "rows": rows,
    }
    (directory / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, directory / "scale_bubble.png")
    result["outputs"] = [str(directory / "scale.json"), str(directory / "scale_bubble.png")]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    result = run_scale(args.out_dir)
    print("\n".join(result["outputs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
