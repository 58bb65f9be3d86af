"""Golden schedules: one text file per (schedule, P, C) under ``tests/schedules/golden/``.

Each file is ``build_schedule(name, P, C).to_text()`` plus a newline, i.e. exactly what
``dualpipe-plugin schedule NAME --ranks P --microbatches C`` prints. ``test_generators.py`` regenerates
every case and compares byte for byte, so any change to a generator's op order shows up as a diff.

The dualpipe and dualpipev files were checked, when written, to be identical to traces of DeepSeek's own
reference implementation (op order per rank); the reference traces are not kept in this repository.

Regenerate after an intended change (then review ``git diff tests/schedules/golden``)::

    .venv/bin/python tests/schedules/regen_golden.py
    # or, equivalently, through the test itself:
    DUALPIPE_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/schedules/test_generators.py -k golden
"""

from __future__ import annotations

import sys
from pathlib import Path

from dualpipe_plugin.schedules import build_schedule

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def golden_cases() -> list[tuple[str, int, int]]:
    """The grid the goldens cover (the dualpipe/dualpipev part is the reference's grid, 59 cases)."""
    cases: list[tuple[str, int, int]] = []
    for p in (2, 4, 6, 8):
        for c in sorted({2 * p, 2 * p + 2, 2 * p + 4, 2 * p + 6, 20}):
            cases.append(("dualpipe", p, c))
    for p in (1, 2, 3, 4, 5):
        for c in sorted({*range(2 * p, 2 * p + 7), 20}):
            cases.append(("dualpipev", p, c))
    for name in ("1f1b", "zb1p"):
        for p in (1, 2, 4):
            for c in sorted({p, 2 * p + 1}):
                cases.append((name, p, c))
    return cases


def golden_path(name: str, num_ranks: int, num_microbatches: int) -> Path:
    return GOLDEN_DIR / f"{name}_P{num_ranks}_C{num_microbatches}.txt"


def render(name: str, num_ranks: int, num_microbatches: int) -> str:
    """The golden text of one case, as the generator produces it now."""
    return build_schedule(name, num_ranks, num_microbatches).to_text() + "\n"


def regenerate() -> list[Path]:
    """Rewrite every golden file and delete files of cases no longer in the grid."""
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for case in golden_cases():
        path = golden_path(*case)
        path.write_text(render(*case))
        written.append(path)
    for stale in set(GOLDEN_DIR.glob("*.txt")) - set(written):
        stale.unlink()
    return written


def main() -> int:
    written = regenerate()
    print(f"wrote {len(written)} golden schedules to {GOLDEN_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
