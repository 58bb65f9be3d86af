"""``benchmarks/deepspeed_moe_overlap.py`` runs end to end (tiny sizes; its figures are not checked here:
timings live in benchmarks/results, never in tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "deepspeed_moe_overlap.py"


def test_benchmark_runs_three_engines_interleaved() -> None:
    from dualpipe_plugin.bench.deepspeed_moe import ENGINES, MoEBenchConfig

    spec = importlib.util.spec_from_file_location("deepspeed_moe_overlap", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = MoEBenchConfig(hidden=32, micro_batches=4, micro_batch=2, seq=8, forward_ms=1.0, backward_ms=2.0,
                            weight_ms=1.0, rounds=2, warmup=0)
    report = script.run(config)
    assert report["overlap_engine_used"] is True
    assert set(report["median_ms"]) == set(ENGINES) and all(v > 0 for v in report["median_ms"].values())
    assert all(len(report["times_ms"][kind]) == 2 for kind in ENGINES)
    assert report["paired_ratio_to_train_schedule"]["train_schedule"] == 1.0
    assert report["a2a_ms"] > 0 and report["config"]["hidden"] == 32
