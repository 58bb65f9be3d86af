"""`dualpipe-plugin demo` trains for real, writes its files, and refuses bad sizes with one clear line."""

from __future__ import annotations

import re

import pytest

from dualpipe_plugin.cli import main

pytestmark = pytest.mark.slow


def test_demo_trains_and_reports(tmp_path, capsys):
    assert main(["demo", "--steps", "8", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) over 8 steps", out).groups())
    assert last < first - 0.3, out  # the generated corpus is learnable: the loss falls visibly
    table = re.findall(r"^\s+(\d)\s+([\d.]+) ms\s+([\d.]+) ms\s+(\d+) \((\d+)\)$", out, re.M)
    assert [int(row[0]) for row in table] == [0, 1, 2, 3]
    assert all(row[3] == row[4] for row in table), table  # measured peak activations = simulated
    (run,) = tmp_path.iterdir()
    for name in ("timeline.png", "trace.json", "loss.png"):
        assert (run / name).stat().st_size > 1000
    assert (run / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_simulated_view(tmp_path, capsys):
    assert main(["demo", "--simulate", "--runs-dir", str(tmp_path)]) == 0
    assert "rank 3: F0:0 F1:0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "dualpipe", "--ranks", "3"], "dualpipe needs an even number of pipeline ranks"),
    (["--microbatches", "5"], "needs at least 2 x ranks = 8 micro-batches"),
    (["--ranks", "8", "--microbatches", "16"], "fewer than the 16 stages"),
    (["--ep", "3"], "cannot be spread evenly over an expert-parallel group of 3 ranks"),
])
def test_demo_bad_sizes(tmp_path, capsys, argv, message):
    assert main(["demo", "--runs-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("engine, marker", [("deepspeed", "train_deepspeed.py: done, final loss"),
                                            ("megatron", "schedule dualpipev | lm loss")])
def test_demo_through_a_framework(capfd, engine, marker):
    pytest.importorskip(engine if engine == "deepspeed" else "megatron.core")
    assert main(["demo", "--engine", engine, "--ranks", "2", "--microbatches", "4", "--steps", "2"]) == 0
    assert marker in capfd.readouterr().out
