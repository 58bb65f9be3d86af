"""Errors the runtime raises. User mistakes are ``ValueError`` subclasses; failures at run time are not."""

from __future__ import annotations

__all__ = [
    "PipelineConfigError", "PipelineRuntimeError", "PipelineTimeoutError", "PipelinePeerError", "NonFiniteLossError",
    "PipelineBrokenError",
]


class PipelineConfigError(ValueError):
    """Bad input to the runtime: wrong number of chunks, a device mismatch, indivisible batch, missing labels."""


class PipelineRuntimeError(RuntimeError):
    """A step failed while running; the message names this rank, the op and the micro-batch."""


class PipelineTimeoutError(PipelineRuntimeError, TimeoutError):
    """A communication wait ran past its timeout (a peer is stuck, dead, or runs a different schedule)."""


class PipelinePeerError(PipelineRuntimeError):
    """A peer closed its connection: it crashed, was killed, or itself failed and gave up."""


class NonFiniteLossError(PipelineRuntimeError, FloatingPointError):
    """A micro-batch loss was NaN or infinite (raised on every rank, with ``detect_nonfinite=True``)."""


class PipelineBrokenError(PipelineRuntimeError):
    """The pipeline's earlier step (or collective) failed, so it refuses to communicate again: messages of the
    failed one may still be in flight on its links. Rebuild the pipeline and resume from a checkpoint."""
