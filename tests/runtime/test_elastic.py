"""A torchrun job that loses a rank mid-step restarts, resumes from its last checkpoint, and ends with the
losses of an uninterrupted run (fp32, CPU, bit for bit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dualpipe_plugin.launch import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _torchrun(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.5",
        str(ROOT / "tests" / "runtime" / "elastic_train.py"), "--out", str(out), *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - started


def _losses(out: Path) -> dict[int, str]:
    lines = [line.split() for line in (out / "losses.txt").read_text().splitlines()]
    return {int(step): loss for step, loss in lines}  # a step logged twice (before the crash) keeps the last


def test_killed_rank_restarts_and_resumes_bit_exactly(tmp_path):
    clean, _ = _torchrun(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    crashed, seconds = _torchrun(tmp_path / "crashed", "--die-at", "3")
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*-9", crashed.stderr), crashed.stderr[-3000:]  # the SIGKILLed worker
    assert "PipelinePeerError: pipeline rank 0: lost pipeline rank 1" in crashed.stderr  # the survivor named it
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "clean")
    assert sorted(_losses(tmp_path / "clean")) == list(range(6))
    print(f"job with one restart finished in {seconds:.1f} s")
