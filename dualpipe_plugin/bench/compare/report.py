"""``bench compare``'s outputs: the full markdown table with the goals, the README's compact table between
its markers, and writing results, table and chart (plus the scaling figures and the README in full
mode)."""

from __future__ import annotations

import json
from pathlib import Path

from dualpipe_plugin.bench.compare.chart import bar_chart
from dualpipe_plugin.bench.compare.config import CompareConfig
from dualpipe_plugin.bench.compare.entries import COMPUTE, MOE

__all__ = ["README_BEGIN", "README_END", "markdown_table", "readme_table", "update_readme", "write_outputs"]

README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def markdown_table(results: dict) -> str:
    """The full per-entry table, one section per cost model."""
    out = []
    titles = {COMPUTE: "Pure compute (P=4, C=16, 8 layers, per layer F=10, B=20, W=10 ms; ideal 960 ms)",
              MOE: "MoE (P=4 × EP=2 = 8 processes; real gloo all-to-all ≈ 40% of F and of I)"}
    for model in (COMPUTE, MOE):
        rows = [e for e in results["entries"] if e["cost_model"] == model]
        if not rows:
            continue
        out += [f"### {titles[model]}", "",
                "| entry | median step ms | × DeepSpeed TrainSchedule (paired) | × best peer | measured / simulated "
                "| simulated ms (as) | peak activations (1/P of the model) | CPU busy |",
                "|---|---|---|---|---|---|---|---|"]
        for e in rows:
            label = f"**{e['label']}**" if e["side"] == "ours" else e["label"]
            if e["status"] != "ok":
                out.append(f"| {label} | {e['status']}: {e.get('reason') or '; '.join(e.get('errors', []))[:120]} "
                           "| | | | | | |")
                continue
            simulated = "–" if e.get("simulated_ms") is None else f"{e['simulated_ms']:.0f} ({e['simulated_as']})"
            out.append(f"| {label} | {e['median_ms']:.0f} | {_fmt(e.get('ratio_to_baseline'), 3)} "
                       f"| {_fmt(e.get('ratio_to_best_peer'), 3)} | {_fmt(e.get('measured_over_simulated'), 3)} "
                       f"| {simulated} | {_fmt(e.get('peak_activations'), 2)} "
                       f"| {_fmt(None if e.get('cpu_utilisation') is None else 100 * e['cpu_utilisation'], 0, '%')} |")
        out.append("")
    goals = results.get("goals", [])
    if goals:
        out += ["### Goals", "", "| goal | value | limit | met |", "|---|---|---|---|"]
        for g in goals:
            met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            out.append(f"| {g['goal']} | {_fmt(g['value'], 3)} | {g['limit']} | {met} |")
        out.append("")
    out.append("Ratios are paired per round (each entry's median over DeepSpeed TrainSchedule's median of the same "
               "round), then the median over rounds. *simulated as*: our simulator on the schedule the entry runs "
               "with the costs it pays (split: I and W apart; no-split: every backward a full B; torch-order: "
               "torch's own action order, its I carrying the W sleep; overlap: MoE pairs perfectly overlapped). "
               "CPU busy: CPU time of the job's processes over the measured steps, as a share of all cores.")
    out.append("")
    machine = results["machine"]
    out.append(f"{results['mode']} run, {results['config']['rounds']} round(s), {machine['date']}, {machine['cpus']} "
               f"cores, load average {machine['load_average_1m_5m_15m'][0]} → {results['load_average_1m_end']}, "
               f"{results['elapsed_s']:.0f} s in all. Command: `dualpipe-plugin bench compare"
               f"{' --quick' if results['mode'] == 'quick' else ''}`.")
    return "\n".join(out) + "\n"


def readme_table(results: dict) -> str:
    """The README's compact table: one row per entry that ran, paired ratio and the goals."""
    lines = ["| cost model | entry | median step ms | × DeepSpeed TrainSchedule | measured / simulated |",
             "|---|---|---|---|---|"]
    for e in results["entries"]:
        label = f"**{e['label']}**" if e["side"] == "ours" else e["label"]
        if e["status"] != "ok":
            lines.append(f"| {e['cost_model']} | {label} | {e['status']} | | |")
            continue
        lines.append(f"| {e['cost_model']} | {label} | {e['median_ms']:.0f} | {_fmt(e.get('ratio_to_baseline'), 3)} "
                     f"| {_fmt(e.get('measured_over_simulated'), 3)} |")
    machine = results["machine"]
    lines += ["", f"Emulated device, P=4, C=16 ({results['mode']} run of `dualpipe-plugin bench compare`, "
              f"{results['config']['rounds']} round(s), {machine['date'][:10]}, load average "
              f"{machine['load_average_1m_5m_15m'][0]}); paired ratios per round, medians. Details, goals and "
              f"peak activations: `benchmarks/results/compare.md`; scaling: `benchmarks/results/scale_bubble.png`."]
    return "\n".join(lines)


def update_readme(results: dict, readme: str | Path) -> bool:
    """Replace the text between the bench markers of ``readme`` with :func:`readme_table`; False if the
    markers are missing."""
    path = Path(readme)
    text = path.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(README_BEGIN)] + "\n" + readme_table(results) + "\n" + text[end:]
    if new != text:
        path.write_text(new)
    return True


def write_outputs(results: dict, config: CompareConfig) -> None:
    """Write the results JSON, the table and the chart (``compare_quick.*`` in quick mode); in full mode also
    the scaling figures and the README table. Adds the paths written to ``results["outputs"]``."""
    directory = Path(config.results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stem = "compare_quick" if config.quick else "compare"
    (directory / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / f"{stem}.md").write_text(markdown_table(results))
    bar_chart(results, directory / f"{stem}.png")
    results["outputs"] = [str(directory / f"{stem}.{ext}") for ext in ("json", "md", "png")]
    if not config.quick:
        from dualpipe_plugin.bench.scale import run_scale

        scale = run_scale(directory)
        results["outputs"] += scale["outputs"]
        if config.readme and update_readme(results, config.readme):
            results["outputs"].append(config.readme)
