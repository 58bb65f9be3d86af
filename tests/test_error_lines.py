"""Ranks sharing a launcher's pipe: each rank's one-line error arrives whole (dualpipe_plugin.distributed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Each writer: 40 lines of 3000 characters ending in its own tag, under `python -u` as the deepspeed
# launcher starts ranks (print would write each text and its newline in two writes).
_WRITER = (
    "import sys\n"
    "from dualpipe_plugin.distributed import print_error_line\n"
    "tag = sys.argv[1]\n"
    "for i in range(40):\n"
    "    print_error_line('x' * 3000 + f' {tag}:{i}')\n"
)


def test_error_lines_of_concurrent_ranks_do_not_interleave(tmp_path: Path) -> None:
    out = tmp_path / "stderr.txt"
    with out.open("wb") as sink:
        procs = [subprocess.Popen([sys.executable, "-u", "-c", _WRITER, f"rank{r}"], cwd=REPO, stderr=sink)
                 for r in range(4)]
        assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = [line for line in out.read_text().splitlines() if line.startswith("x")]
    assert len(lines) == 160
    for line in lines:
        body, tag = line.rsplit(" ", 1)
        assert body == "x" * 3000 and tag.startswith("rank"), line[-40:]


def test_a_multi_line_message_becomes_one_line(capfd) -> None:
    from dualpipe_plugin.distributed import print_error_line

    print_error_line("prog: error: first\nsecond")
    assert capfd.readouterr().err == "prog: error: first second\n"
