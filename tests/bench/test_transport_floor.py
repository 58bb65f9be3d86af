"""``benchmarks/transport_floor.py``: its hand-written 1F1B is a real 1F1B, and the script runs end to end
(its timings are recorded in benchmarks/results/, never asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dualpipe_plugin.schedules import OpKind, build_schedule

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transport_floor.py"


def _load():
    spec = importlib.util.spec_from_file_location("transport_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ranks,microbatches", [(2, 4), (4, 16), (4, 3)])
def test_raw_loop_runs_the_registry_1f1b_with_full_backwards(ranks, microbatches) -> None:
    """The raw loop knows only F and full B: the registry's 1F1B must give it nothing else, and each
    micro-batch once each way, its F first."""
    floor = _load()
    schedule = build_schedule("1f1b", ranks, microbatches)
    for rank in range(ranks):
        assert {a.kind for a in schedule.actions[rank]} == {OpKind.F, OpKind.B}
        order = floor.one_f_one_b_order(rank, ranks, microbatches)
        every = [(kind, m) for kind in "FB" for m in range(microbatches)]
        assert sorted(order) == sorted(every)
        assert all(order.index(("F", m)) < order.index(("B", m)) for m in range(microbatches))
        warmup = min(ranks - 1 - rank, microbatches)
        assert order[:warmup] == [("F", m) for m in range(warmup)]


@pytest.mark.slow
def test_script_runs_and_records(tmp_path) -> None:
    out = tmp_path / "floor.json"
    subprocess.run([sys.executable, str(SCRIPT), "--ranks", "2", "--microbatches", "4", "--rounds", "1",
                    "--messages", "3", "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["hop_latency_ms"]["messages"] == 3
    assert result["raw_1f1b"]["median_ms"] > result["simulated_ms"] * 0.99
    assert result["ours_1f1b"]["median_ms"] > result["simulated_ms"] * 0.99
