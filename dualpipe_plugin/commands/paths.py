"""Output paths checked at the door: before a command simulates, trains or benchmarks anything, the file or
folder it will write is shown to be writable, so a bad path costs one error line, never a finished run.

Each check raises :class:`~dualpipe_plugin.cli.UsageError` naming the option, the problem and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from dualpipe_plugin.cli import UsageError

__all__ = ["check_output_file", "make_output_dir"]


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):  # no pathconf (Windows) or an unknown filesystem: the common limit
        return 255


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to look up: it does not exist either
        return False


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if _exists(candidate):
            return candidate
    return Path(".")


def _check_components(path: Path, option: str, raw: str) -> None:
    """Every name in ``path`` fits the filesystem, and whatever already exists above it is a folder."""
    ancestor = _existing_ancestor(path.parent)
    limit = _name_max(ancestor if ancestor.is_dir() else ancestor.parent)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            shown = raw if len(raw) < 60 else raw[:40] + "..."
            raise UsageError(
                f"{option} {shown}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long, more than the "
                f"{limit} this filesystem allows; choose a shorter name"
            )
    if not ancestor.is_dir():
        raise UsageError(f"{option} {raw}: {ancestor} is a file, not a folder; choose a path inside a folder")


def _probe(folder: Path, name: str) -> None:
    """Create and remove a file in ``folder`` named after ``name`` and this process, so that the ranks of a
    distributed launch checking the same path at once never remove each other's probe."""
    probe = folder / f".{name}.{os.getpid()}.probe"
    probe.write_bytes(b"")
    probe.unlink()


def check_output_file(raw: str, option: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """``raw`` can be written as a file: an existing file opened for appending, else a probe file created and
    removed beside it (the target itself is never created or removed here)."""
    if not raw or raw.endswith(("/", os.sep)):
        raise UsageError(f"{option} {raw!r} names a folder; give a file name, e.g. {raw or './'}timeline.png")
    path = Path(raw)
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {raw}: cannot tell the output format; name it *{' or *'.join(suffixes)}")
    _check_components(path, option, raw)
    if path.is_dir():
        raise UsageError(f"{option} {raw} is an existing folder; give a file name inside it, e.g. {path / 'out'}"
                         f"{suffixes[0] if suffixes else '.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):  # an existing file: writable as it is (nothing created, nothing removed)
                pass
        else:
            _probe(path.parent, path.name)
    except OSError as error:
        raise UsageError(
            f"{option} {raw} cannot be written ({error.strerror or error}); choose a writable path"
        ) from None
    return path


def make_output_dir(path: Path, option: str, raw: str) -> Path:
    """Create the folder ``path`` (under the user's ``raw`` option value) and show that files can be written in it."""
    _check_components(path / "probe", option, raw)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe(path, "write-test")
    except OSError as error:
        raise UsageError(f"{option} {raw}: cannot write into {path} ({error.strerror or error}); choose a writable "
                         f"folder") from None
    return path
