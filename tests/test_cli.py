"""The ``dualpipe-plugin`` CLI: schedule / simulate / visualize, in-process and through the installed script.

Bad input exits with status 2 and one ``dualpipe-plugin <cmd>: error: ...`` line naming the fix, never a
traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dualpipe_plugin.cli import main

GOLDEN = Path(__file__).resolve().parent / "schedules" / "golden"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _script() -> str:
    """The installed console script: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "dualpipe-plugin"
    found = str(beside) if beside.exists() else shutil.which("dualpipe-plugin")
    if found is None:
        pytest.fail("the dualpipe-plugin console script is not installed; run: pip install -e .")
    return found


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- schedule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, p, c", [("dualpipe", 4, 8), ("dualpipe", 8, 20), ("dualpipev", 3, 7), ("zb1p", 4, 9)])
def test_schedule_prints_the_golden_text(capsys, name: str, p: int, c: int) -> None:
    code, out, err = _run(capsys, "schedule", name, "--ranks", str(p), "--microbatches", str(c))
    assert code == 0 and err == ""
    assert out == (GOLDEN / f"{name}_P{p}_C{c}.txt").read_text()


def test_schedule_short_flags(capsys) -> None:
    code, out, _ = _run(capsys, "schedule", "dualpipev", "-P", "3", "-C", "7")
    assert code == 0 and out == (GOLDEN / "dualpipev_P3_C7.txt").read_text()


# --- simulate ------------------------------------------------------------------------------------------


def test_simulate_json(capsys) -> None:
    code, out, err = _run(
        capsys, "simulate", "dualpipe", "--ranks", "4", "--microbatches", "8", "--cost", "F=1,B=2,I=1,W=1,FB=3", "--json"
    )
    assert code == 0 and err == ""
    figures = json.loads(out)
    assert {"makespan", "idle_per_rank", "bubble", "peak_activations_per_rank"} <= set(figures)
    assert figures["idle_per_rank"] == [2.0] * 4  # (P/2-1)(F&B+B-3W) = 1 * (3+2-3)
    assert figures["bubble"] == 2.0
    assert figures["peak_activations_per_rank"] == [5] * 4
    assert (figures["schedule"], figures["ranks"], figures["microbatches"]) == ("dualpipe", 4, 8)


def test_simulate_json_default_costs(capsys) -> None:
    code, out, _ = _run(capsys, "simulate", "1f1b", "--ranks", "4", "--microbatches", "8", "--json")
    figures = json.loads(out)
    assert code == 0 and figures["idle_per_rank"] == [9.0] * 4 and figures["peak_activations_per_rank"] == [4, 3, 2, 1]


def test_simulate_table(capsys) -> None:
    code, out, _ = _run(capsys, "simulate", "dualpipev", "--ranks", "2", "--microbatches", "5", "--cost", "F=1,B=2,W=1,comm=0.5")
    assert code == 0
    assert "makespan" in out and "bubble" in out and "peak activations" in out
    assert len([line for line in out.splitlines() if line.strip().split()[:1] in (["0"], ["1"])]) == 2


# --- visualize -----------------------------------------------------------------------------------------


def test_visualize_png(capsys, tmp_path) -> None:
    target = tmp_path / "timeline.png"
    code, out, _ = _run(capsys, "visualize", "dualpipe", "--ranks", "4", "--microbatches", "8", "--out", str(target))
    assert code == 0 and str(target) in out
    assert target.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(300)
def test_visualize_png_of_a_large_schedule_finishes(tmp_path) -> None:
    """An artist per op took 146 s here at this size (and over 300 s at P=64, C=512); one collection takes seconds.
    In a subprocess, so the old behaviour fails cleanly on the subprocess timeout."""
    from PIL import Image

    target = tmp_path / "large.png"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "dualpipe_plugin.cli", "visualize", "dualpipev", "-P", "32", "-C", "256",
         "--cost", "F=1,B=2,W=1,FB=3", "--out", str(target)],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0 and str(target) in done.stdout, done.stderr
    assert target.read_bytes()[:8] == PNG_MAGIC
    with Image.open(target) as image:
        image.load()  # decodes the whole file: a truncated PNG raises here
        assert image.width == 2520 and image.height > 1000
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 22)}
    assert (0xF6, 0xC6, 0x5B) in colours and (0x55, 0xA6, 0x4E) in colours  # F chunk 0 and W chunk 1 bars drawn


def test_visualize_chrome_trace(capsys, tmp_path) -> None:
    target = tmp_path / "trace.json"
    code, _, _ = _run(capsys, "visualize", "dualpipev", "-P", "3", "-C", "7", "--out", str(target))
    assert code == 0
    events = json.loads(target.read_text())["traceEvents"]
    assert len([event for event in events if event["ph"] == "X"]) == sum(
        len(line.split()) - 2 for line in (GOLDEN / "dualpipev_P3_C7.txt").read_text().splitlines()
    )
    assert {event["tid"] for event in events if event["ph"] == "X"} == {0, 1, 2}


# --- bad input -----------------------------------------------------------------------------------------

_BAD = [
    (["schedule", "dualpipe", "--ranks", "3", "--microbatches", "8"], "schedule", "or the 'dualpipev' schedule"),
    (["schedule", "dualpipe", "--ranks", "4", "--microbatches", "9"], "schedule", "use 10"),
    (["schedule", "dualpipev", "--ranks", "4", "--microbatches", "7"], "schedule", "at least 2 x ranks = 8"),
    (["schedule", "dualpipe", "--ranks", "4", "--microbatches", "6"], "schedule", "raise the micro-batch count"),
    (["schedule", "dualpipev", "--ranks", "0", "--microbatches", "4"], "schedule", "at least 1 pipeline rank"),
    (["schedule", "1f1b", "--ranks", "-2", "--microbatches", "4"], "schedule", "at least 1 pipeline rank"),
    (["schedule", "gpipe", "--ranks", "4", "--microbatches", "8"], "schedule", "valid schedules: dualpipe, dualpipev, 1f1b, zb1p, zbv"),
    (["simulate", "dualpipev", "-P", "2", "-C", "4", "--cost", "F=-1,B=2,W=1"], "simulate", "every cost must be >= 0"),
    (["simulate", "dualpipev", "-P", "2", "-C", "4", "--cost", "F=1,B="], "simulate", "cost B is missing its value"),
    (["simulate", "dualpipev", "-P", "2", "-C", "4", "--cost", "F1,B2"], "simulate", "expected KEY=NUMBER"),
    (["simulate", "dualpipev", "-P", "2", "-C", "4", "--cost", "F=1;B=2"], "simulate", "is not a number"),
    (["simulate", "dualpipev", "-P", "2", "-C", "4", "--cost", "X=1"], "simulate", "KEY one of F, B, I, W, FB, comm"),
    (["simulate", "dualpipev", "-P", "2", "-C", "4", "--cost", ""], "simulate", "empty cost string"),
    (["visualize", "zb1p", "-P", "2", "-C", "4", "--out", "timeline.svg"], "visualize", "name it *.png"),
    (["visualize", "dualpipe", "-P", "3", "-C", "8", "--out", "timeline.png"], "visualize", "even"),
]


def _assert_one_clear_error(err: str, command: str, fix: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dualpipe-plugin {command}: error: "), err
    assert fix in lines[0], err


@pytest.mark.parametrize("argv, command, fix", _BAD, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_bad_input_exits_2_with_one_line(capsys, argv: list[str], command: str, fix: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # visualize must not leave files behind
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    _assert_one_clear_error(err, command, fix)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, command, fix",
    [
        (["schedule", "dualpipe", "--microbatches", "8"], "schedule", "the following arguments are required: --ranks"),
        (["schedule", "dualpipe", "--ranks", "four", "--microbatches", "8"], "schedule", "invalid int value: 'four'"),
        (["simulate", "dualpipe", "-P", "4", "-C", "8", "--cost"], "simulate", "--cost: expected one argument"),
        (["visualize", "dualpipe", "-P", "4", "-C", "8"], "visualize", "the following arguments are required: --out"),
        (["nonsense"], "", "invalid choice: 'nonsense'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv: list[str], command: str, fix: str) -> None:
    """argparse's own errors: usage, then ``dualpipe-plugin <cmd>: error: ...``; status 2, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    prefix = f"dualpipe-plugin {command}: error: " if command else "dualpipe-plugin: error: "
    [line] = [line for line in err.splitlines() if line.startswith(prefix)]
    assert fix in line


# --- the installed entry point -------------------------------------------------------------------------


def test_console_script_schedule() -> None:
    done = subprocess.run(
        [_script(), "schedule", "dualpipe", "--ranks", "4", "--microbatches", "8"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (GOLDEN / "dualpipe_P4_C8.txt").read_text()


def test_console_script_bad_input() -> None:
    done = subprocess.run(
        [_script(), "simulate", "dualpipe", "--ranks", "3", "--microbatches", "8", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    _assert_one_clear_error(done.stderr, "simulate", "'dualpipev'")


def test_console_script_usage_error() -> None:
    done = subprocess.run([_script(), "schedule", "dualpipe"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert any(line.startswith("dualpipe-plugin schedule: error: ") for line in done.stderr.splitlines())


# --- checks at the door: bad paths and numbers cost one error line, before any work ---------------------

_LONG = "a" * 300


@pytest.fixture
def no_ranks(monkeypatch):
    """Any attempt to start ranks (a benchmark, a training demo) fails the test: the checks come first."""
    import dualpipe_plugin.bench.step
    import dualpipe_plugin.demo.engines
    import dualpipe_plugin.launch

    def refuse(*args, **kwargs):
        raise AssertionError("ranks were started before the bad input was refused")

    monkeypatch.setattr(dualpipe_plugin.launch, "run_local", refuse)
    monkeypatch.setattr(dualpipe_plugin.bench.step, "run_local", refuse)
    monkeypatch.setattr(dualpipe_plugin.demo.engines, "run_engine_demo", refuse)


_AT_THE_DOOR = [
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--out", "afile/t.png"], "afile is a file, not a folder"),
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--out", "afile/t.json"], "afile is a file, not a folder"),
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--out", "adir.png"], "adir.png is an existing folder; give a file"),
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--out", "new.png/"], "names a folder; give a file name"),
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--out", f"{_LONG}.png"], "bytes long, more than the 255"),
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--out", "/proc/t.png"], "cannot be written (No such file"),
    (["visualize", "1f1b", "-P", "2", "-C", "2", "--cost", "F=0,B=0,W=0", "--out", "t.png"], "nothing to draw"),
    (["demo", "--simulate", "--runs-dir", "afile"], "--runs-dir afile: afile is a file, not a folder"),
    (["demo", "--simulate", "--runs-dir", _LONG], "bytes long, more than the 255"),
    (["demo", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["demo", "--steps", "0", "--engine", "deepspeed"], "--steps must be at least 1, got 0"),
    (["bench", "--out", "afile/result.json"], "afile is a file, not a folder"),
    (["bench", "--out", "adir.png"], "is an existing folder"),
    (["bench", "--emulate", "F=0,B=0,W=0"], "needs F > 0 and B > 0 ms"),
    (["bench", "--emulate", "F=1e308,B=1,W=1"], "the costs are milliseconds"),
    (["bench", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["bench", "--steps", "-3"], "--steps must be at least 1, got -3"),
    (["bench", "overlap", "--steps", "0"], "--steps must be at least 1"),
    (["advise", "-P", "0", "-C", "4"], "advise needs at least 1 pipeline rank, got 0"),
    (["advise", "-P", "4", "-C", "8", "--memory-cap", "nan"], "memory cap must be positive and finite, got nan"),
    (["advise", "-P", "4", "-C", "8", "--memory-cap", "inf"], "or leave it out for no cap"),
    (["advise", "-P", "4", "-C", "8", "--cost", "F=1e308,B=1e308,W=1"], "add up to inf"),
    (["advise", "-P", "4", "-C", "8", "--cost", "F=1e307,B=1e307,W=1"], "overflows to inf; express them in a larger"),
    (["advise", "-P", "4", "-C", "8", "--cost", "F=0,B=0,W=0"], "nothing to rank; give F and B > 0"),
    (["simulate", "1f1b", "-P", "4", "-C", "8", "--cost", "F=1e307,B=1e307,W=1"], "overflows to inf"),
    (["schedule", "1f1b", "-P", "1000", "-C", "1001"], "is more than the 1,000,000 the command line builds"),
]


@pytest.mark.parametrize("argv, fix", _AT_THE_DOOR, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:70])
def test_bad_paths_and_numbers_are_refused_at_the_door(capsys, tmp_path, monkeypatch, no_ranks, argv, fix) -> None:
    if argv[-1].startswith("/proc/") and not Path("/proc").is_dir():
        pytest.skip("needs /proc (a folder nobody can create files in, even root)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.png").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    _assert_one_clear_error(err, argv[0], fix)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing created


_CHECKER = (
    "import sys\n"
    "from dualpipe_plugin.commands.paths import check_output_file, make_output_dir\n"
    "from pathlib import Path\n"
    "for _ in range(300):\n"
    "    check_output_file(sys.argv[1])\n"
    "    make_output_dir(Path(sys.argv[2]), '--runs-dir', sys.argv[2])\n"
)


def test_ranks_checking_the_same_output_path_at_once_do_not_trip_each_other(tmp_path: Path) -> None:
    """Under torchrun every rank checks the same --out at the door (seen failing: one rank removed the
    file another had just created to test it)."""
    out, runs = str(tmp_path / "costs.json"), str(tmp_path / "runs")
    procs = [subprocess.Popen([sys.executable, "-c", _CHECKER, out, runs], cwd=Path(__file__).resolve().parent.parent,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert not Path(out).exists() and list(Path(runs).iterdir()) == []
