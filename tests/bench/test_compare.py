"""``bench compare``: the harness logic (pairing, medians, goals, tables, README markers, simulation of what
each entry pays) and, marked slow, one tiny end-to-end run. No timing is asserted: timing claims live in
``benchmarks/`` with their recorded results."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dualpipe_plugin.bench.compare.cli import main as compare_main
from dualpipe_plugin.bench.compare.config import CompareConfig
from dualpipe_plugin.bench.compare.entries import BASELINE, COMPUTE, MOE, Entry, availability, entries_for, select
from dualpipe_plugin.bench.compare.report import README_BEGIN, README_END, markdown_table, readme_table, update_readme
from dualpipe_plugin.bench.compare.run import run_compare
from dualpipe_plugin.bench.compare.simulate import layers_per_chunk, simulated_ms, torch_order_schedule
from dualpipe_plugin.bench.compare.summary import evaluate_goals, paired_ratios, summarize
from dualpipe_plugin.bench.scale import scale_table
from dualpipe_plugin.bench.workload import MoEWorkload, Workload


def _entry(key: str, side: str = "peer", model: str = COMPUTE) -> Entry:
    return Entry(key, key, side, model, "x:y")


# -- entries ------------------------------------------------------------------------------------------------
def test_every_entry_the_issue_names_is_there() -> None:
    keys = {e.key for e in entries_for(quick=True)}
    assert {"ours:dualpipe", "ours:dualpipev", "ours:1f1b", "ours:zb1p", "ours:zbv", "ours:dualpipev@deepspeed",
            "ours:dualpipev@megatron", "torch:ScheduleDualPipeV", "torch:Schedule1F1B", "torch:ScheduleZBVZeroBubble",
            "deepspeed:TrainSchedule", "deepspeed:DualPipeVEngine", "megatron:1F1B", "megatron:interleaved",
            "ours:dualpipev+overlap@moe", "torch:ScheduleDualPipeV@moe", "deepspeed:TrainSchedule@moe",
            "deepspeed:DualPipeVEngine@moe"} <= keys
    assert set(BASELINE.values()) <= keys
    full = {e.key for e in entries_for(quick=False)}
    assert full - keys == {"ours:dualpipev@moe"}  # overlap off: full mode only
    assert len(keys) == len(entries_for(quick=True))  # keys are unique


def test_select_keeps_the_baseline_of_each_chosen_cost_model() -> None:
    with pytest.raises(ValueError, match="unknown bench compare entries"):
        select(entries_for(quick=True), ["ours:nope"])
    chosen = [e.key for e in select(entries_for(quick=True), ["ours:1f1b"])]
    assert chosen == ["ours:1f1b", BASELINE[COMPUTE]]
    chosen = [e.key for e in select(entries_for(quick=True), ["ours:dualpipev+overlap@moe", "ours:zb1p"])]
    assert chosen == ["ours:zb1p", BASELINE[COMPUTE], "ours:dualpipev+overlap@moe", BASELINE[MOE]]
    assert len(select(entries_for(quick=True), [])) == len(entries_for(quick=True))


def test_an_entry_whose_module_is_missing_is_not_available() -> None:
    entry = replace(_entry("x"), requires=("surely_not_a_module_xyz",))
    assert "not installed" in availability(entry)
    entry = replace(_entry("x"), requires=("dualpipe_plugin.surely_missing",))
    assert "import dualpipe_plugin.surely_missing failed" in availability(entry)
    assert availability(_entry("x")) is None


# -- statistics ---------------------------------------------------------------------------------------------
def test_paired_ratios_skip_rounds_where_either_side_failed() -> None:
    assert paired_ratios([100.0, None, 90.0, 80.0], [200.0, 200.0, None, 160.0]) == [0.5, 0.5]
    assert paired_ratios([], []) == []


def test_summarize_medians_pairs_and_best_peer() -> None:
    entries = [_entry("ours:a", "ours"), _entry(BASELINE[COMPUTE]), _entry("peer:b")]
    runs = {
        "ours:a": [{"steps_ms": [90.0, 110.0]}, {"steps_ms": [80.0]}, {"error": "rank 0: boom"}],
        BASELINE[COMPUTE]: [{"steps_ms": [200.0, 200.0]}, {"steps_ms": [100.0]}, {"steps_ms": [150.0]}],
        "peer:b": [{"steps_ms": [120.0]}, {"steps_ms": [120.0]}, {"steps_ms": [120.0]}],
    }
    summary = summarize(runs, entries)
    ours = summary["ours:a"]
    assert ours["median_ms"] == 90.0  # of all measured steps: 80, 90, 110
    assert ours["round_medians_ms"] == [100.0, 80.0, None]
    assert ours["paired_ratios"] == [0.5, 0.8]
    assert ours["ratio_to_baseline"] == pytest.approx(0.65)
    assert summary[BASELINE[COMPUTE]]["ratio_to_baseline"] == 1.0
    assert summary["peer:b"]["ratio_to_best_peer"] == 1.0  # the best peer (120 < 175)
    assert ours["ratio_to_best_peer"] == pytest.approx(90 / 120)


def _results(ours_rounds, base_rounds, moe_rounds=None, moe_base=None, torch_moe=None) -> dict:
    def row(key, side, model, rounds, **extra):
        return {"key": key, "label": key, "side": side, "cost_model": model, "status": "ok",
                "round_medians_ms": rounds, "median_ms": rounds[0], **extra}

    rows = [row("ours:dualpipev", "ours", COMPUTE, ours_rounds, measured_over_simulated=1.02),
            row(BASELINE[COMPUTE], "peer", COMPUTE, base_rounds),
            row("torch:Schedule1F1B", "peer", COMPUTE, base_rounds)]
    if moe_rounds:
        rows += [row("ours:dualpipev+overlap@moe", "ours", MOE, moe_rounds, measured_over_simulated=1.5),
                 row(BASELINE[MOE], "peer", MOE, moe_base),
                 row("torch:ScheduleDualPipeV@moe", "peer", MOE, torch_moe)]
    for r in rows:
        base = BASELINE[r["cost_model"]]
        other = next(x for x in rows if x["key"] == base)
        ratios = paired_ratios(r["round_medians_ms"], other["round_medians_ms"])
        r["ratio_to_baseline"] = sorted(ratios)[len(ratios) // 2]
    return {"entries": rows}


def test_goals_report_value_limit_and_verdict() -> None:
    goals = {g["goal"]: g for g in evaluate_goals(_results([850.0], [1000.0], [1500.0], [2000.0], [1800.0]))}
    assert goals["compute: ours dualpipev / DeepSpeed TrainSchedule (paired)"] == {
        "goal": "compute: ours dualpipev / DeepSpeed TrainSchedule (paired)", "value": 0.85, "limit": 0.86, "met": True}
    assert goals["compute: ours dualpipev ahead of every peer"]["met"] is True
    assert goals["moe: ours dualpipev + overlap / DeepSpeed TrainSchedule (paired)"]["met"] is True  # 0.75
    assert goals["moe: ours dualpipev + overlap / torch ScheduleDualPipeV (paired)"]["value"] == pytest.approx(0.833)
    assert goals["moe: ours dualpipev + overlap / DeepSpeed DualPipeVEngine (paired)"]["met"] is None  # not run
    assert goals["compute: ours:dualpipev measured / simulated"]["met"] is True
    assert goals["moe: ours:dualpipev+overlap@moe measured / simulated"]["met"] is False
    slow = {g["goal"]: g for g in evaluate_goals(_results([900.0], [1000.0]))}
    assert slow["compute: ours dualpipev / DeepSpeed TrainSchedule (paired)"]["met"] is False
    assert slow["moe: ours dualpipev + overlap / DeepSpeed TrainSchedule (paired)"]["met"] is None


# -- simulation of what each entry pays -----------------------------------------------------------------------
def test_simulated_figures_for_the_issue_costs() -> None:
    dense = Workload()
    by_key = {e.key: e for e in entries_for(quick=False)}

    def sim(key, workload=dense, transfer_ms=0.0, order=None):
        entry = by_key[key]
        return simulated_ms(entry, workload, layers_per_chunk(entry, workload), transfer_ms, order)

    assert dense.microbatches * dense.layers * 30 / dense.ranks == 960  # the ideal step
    assert sim("ours:dualpipev") == 1020  # 960 + (8/2 - 1)(F&B + B - 3W) per 1-layer chunk = 960 + 60
    assert sim("ours:1f1b") == sim(BASELINE[COMPUTE]) == 1140  # (C + P - 1)(F + B) per 2-layer stage
    assert sim("deepspeed:DualPipeVEngine") > sim("ours:dualpipev")  # no W split: W cannot fill bubbles
    assert sim("megatron:interleaved") is None  # no equivalent schedule in our registry
    assert sim("torch:ScheduleZBVZeroBubble") is None  # needs torch's own order
    moe = replace(dense, moe=MoEWorkload())
    overlapped, sequential = sim("ours:dualpipev+overlap@moe", moe, 3.0), sim("ours:dualpipev@moe", moe, 3.0)
    assert overlapped < sequential < sim(BASELINE[MOE], moe, 3.0)


def test_torch_order_converts_to_our_ir_and_simulates() -> None:
    from dualpipe_plugin.schedules import build_schedule

    # The text form of our own dualpipev, written the way torch prints a V schedule (stage index, kind,
    # micro-batch; stage s < P is chunk 0, else chunk 1 = stage 2P-1-r), must convert back to the same ops.
    ranks, microbatches = 2, 4
    ours = build_schedule("dualpipev", ranks, microbatches)
    order = {}
    for rank, actions in enumerate(ours.actions):
        row = []
        for action in actions:
            texts = []
            for op in action.ops():
                stage = rank if op.chunk == 0 else 2 * ranks - 1 - rank
                texts.append(f"{stage}{op.kind.value}{op.microbatch}")
            row.append(f"({texts[0]};{texts[1]})OVERLAP_F_B" if len(texts) == 2 else texts[0])
        order[rank] = row + [f"{rank}REDUCE_GRAD"]
    converted = torch_order_schedule(order, ranks, microbatches)
    assert converted.to_text() == ours.to_text()
    entry = next(e for e in entries_for(quick=True) if e.key == "torch:ScheduleDualPipeV")
    workload = Workload(ranks=ranks, microbatches=microbatches)
    assert simulated_ms(entry, workload, layers_per_chunk(entry, workload), 0.0, order) is not None


# -- tables and the README ------------------------------------------------------------------------------------
def _rendered_results() -> dict:
    results = _results([850.0], [1000.0], [1500.0], [2000.0], [1800.0])
    results["entries"].append({"key": "megatron:1F1B", "label": "Megatron-Core 1F1B", "side": "peer",
                               "cost_model": COMPUTE, "status": "not available",
                               "reason": "megatron.core is not installed"})
    results["goals"] = evaluate_goals(results)
    results |= {"mode": "quick", "config": {"rounds": 1}, "load_average_1m_end": 2.0, "elapsed_s": 100.0,
                "machine": {"date": "2026-01-01T00:00:00+00:00", "cpus": 2, "load_average_1m_5m_15m": [1.0, 1, 1]}}
    return results


def test_tables_show_every_entry_and_the_goals() -> None:
    results = _rendered_results()
    table = markdown_table(results)
    assert "| **ours:dualpipev** | 850 | 0.850 |" in table
    assert "not available: megatron.core is not installed" in table
    assert "| compute: ours dualpipev / DeepSpeed TrainSchedule (paired) | 0.850 | 0.86 | yes |" in table
    short = readme_table(results)
    assert short.count("\n| ") == len(results["entries"])  # one row per entry after the header
    assert "| moe | **ours:dualpipev+overlap@moe** | 1500 | 0.750 | 1.500 |" in short


def test_update_readme_replaces_only_between_the_markers(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\nkept\n\n{README_BEGIN}\nold table\n{README_END}\n\n## After\n")
    assert update_readme(_rendered_results(), readme)
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# x\n\n## Benchmarks\n\nkept\n\n" + README_BEGIN + "\n| cost model |")
    assert text.endswith(README_END + "\n\n## After\n")
    once = text
    assert update_readme(_rendered_results(), readme) and readme.read_text() == once  # idempotent
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    assert not update_readme(_rendered_results(), bare)
    assert bare.read_text() == "no markers\n"


def test_readme_regeneration_from_a_results_file(tmp_path, capsys) -> None:
    results_file = tmp_path / "compare.json"
    results_file.write_text(json.dumps(_rendered_results()))
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    assert compare_main(["readme", str(results_file), "--readme", str(readme)]) == 0
    assert "| compute | **ours:dualpipev** | 850 |" in readme.read_text()


def test_the_repository_readme_has_the_markers() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin = text.index(README_BEGIN)
    assert begin < text.index(README_END)
    headings = [line for line in text[:begin].splitlines() if line.startswith("## ")]
    assert headings[-1] == "## Benchmarks"  # the markers sit in the Benchmarks section


# -- scale ----------------------------------------------------------------------------------------------------
def test_scale_rows_match_deepseeks_bubble_table() -> None:
    rows = scale_table(ranks_grid=(4,), multiples=(4,))
    by = {(r["schedule"], r["pair"]): r for r in rows}
    # Per 1/P of the model F=1, B=2, W=1 (ideal 3C): 1F1B (P-1)(F+B) = 9; ZB1P (P-1)(F+B-2W) = 3.
    assert by[("1f1b", 1.0)]["makespan"] == 48 + 9
    assert by[("zb1p", 1.0)]["makespan"] == 48 + 3
    assert by[("dualpipev", 0.75)]["bubble_fraction"] < by[("dualpipev", 1.0)]["bubble_fraction"]
    assert by[("dualpipev", 1.0)]["peak_activations"] == 4.5  # 2P+1 chunks of 1/(2P): P + 1/2
    assert {r["schedule"] for r in rows} == {"1f1b", "zb1p", "dualpipe", "dualpipev", "zbv"}
    assert by[("zbv", 1.0)]["peak_activations"] == 4  # 1F1B's memory: 2P chunks of 1/(2P)


# -- one tiny run (spawns processes) ------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_end_to_end_run_writes_results_table_chart_and_readme(tmp_path) -> None:
    pytest.importorskip("deepspeed")  # the baseline every ratio is paired to
    readme = tmp_path / "README.md"
    readme.write_text(f"## Benchmarks\n{README_BEGIN}\n{README_END}\n")
    config = CompareConfig(rounds=1, steps=1, moe_steps=1, warmup=1, ranks=2, microbatches=4, forward_ms=1.0,
                           backward_ms=2.0, weight_ms=1.0, results_dir=str(tmp_path / "results"),
                           readme=str(readme), only=("ours:dualpipev", "torch:Schedule1F1B"))
    results = run_compare(config)
    rows = {e["key"]: e for e in results["entries"]}
    assert set(rows) == {"ours:dualpipev", "torch:Schedule1F1B", BASELINE[COMPUTE]}
    for key in ("ours:dualpipev", "torch:Schedule1F1B", BASELINE[COMPUTE]):
        assert rows[key]["status"] == "ok", rows[key]
        assert len(rows[key]["runs"]) == 1 and len(rows[key]["runs"][0]["steps_ms"]) == 1
        assert rows[key]["peak_activations"] > 0
    assert rows[BASELINE[COMPUTE]]["ratio_to_baseline"] == 1.0
    assert rows["ours:dualpipev"]["simulated_ms"] > 0
    assert rows["ours:dualpipev"]["extras"]["executor_peak_chunks"] == 2 * 2 + 1  # 2P+1 chunks, P=2
    for path in ("compare.json", "compare.md", "compare.png", "scale.json", "scale_bubble.png"):
        assert (tmp_path / "results" / path).exists(), path
    assert "| compute | **ours dualpipev** |" in readme.read_text()
