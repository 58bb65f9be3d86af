"""A pipeline's memory of its first failure: after a failed step or collective it communicates no more.

A step that fails half way (a dead or stuck peer, an error in a layer) leaves its transfers half done: a
peer may still send what this rank will never receive, or wait for what it will never send, and the next
step would take those messages for its own (it used to die in ``decode_header`` blaming a live peer).
:class:`FailureLatch` wraps everything that communicates; the first exception that escapes one is
remembered, and every later one is refused with :class:`~dualpipe_plugin.runtime.errors.PipelineBrokenError`
saying to rebuild the pipeline. Errors raised before anything is sent do not pass through it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from dualpipe_plugin.runtime.errors import PipelineBrokenError

__all__ = ["FailureLatch"]


class FailureLatch:
    """Remembers what failed first on pipeline rank ``rank``; refuses what comes after."""

    def __init__(self, rank: int):
        self.rank = rank
        self.failure: str | None = None
        """What failed (the op and the error's first line), or None while the pipeline is usable."""

    def refuse_if_failed(self, what: str) -> None:
        """Raise :class:`PipelineBrokenError` for ``what`` if something failed before."""
        if self.failure is not None:
            raise PipelineBrokenError(
                f"pipeline rank {self.rank}: refusing {what}: {self.failure} failed earlier on this pipeline, and "
                f"messages of it may still be in flight on its links, where they would be taken for this one's. "
                f"Rebuild it: close() this pipeline, build a new one (a new DualPipeline makes new process "
                f"groups; pass a new transport if you pass your own) and resume from your last checkpoint"
            )

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run ``what`` (which communicates) unless something failed before; remember it if it fails."""
        self.refuse_if_failed(what)
        try:
            yield
        except BaseException as error:
            detail = str(error).splitlines()[0] if str(error) else ""
            self.failure = f"{what} ({type(error).__name__}{': ' + detail[:200] if detail else ''})"
            raise
