"""The runtime: executes any schedule of :mod:`dualpipe_plugin.schedules` on ``torch.distributed``.

Standalone entry points are re-exported here; the framework adapters use :class:`PipelineExecutor` with
one :class:`PipelineOptions`. The errors and the options import without torch (the adapters' argument
parsers use them before any model exists); everything else loads on first use.
"""

from importlib import import_module

from dualpipe_plugin.runtime.errors import (
    NonFiniteLossError,
    PipelineBrokenError,
    PipelineConfigError,
    PipelinePeerError,
    PipelineRuntimeError,
    PipelineTimeoutError,
)
from dualpipe_plugin.runtime.options import DEFAULT_TIMEOUT_S, PipelineOptions

_LAZY = {
    "CheckpointError": "checkpoint", "latest_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ActionTiming": "executor", "PipelineExecutor": "executor", "StageHooks": "executor", "StepOutcome": "executor",
    "DualPipeline": "pipeline", "StepResult": "pipeline", "split_stages": "pipeline", "stage_modules": "pipeline",
    "MicrobatchRNG": "rng", "MirroredGeneratorWarning": "rng", "set_microbatch": "rng",
    "Channel": "transport", "TorchTransport": "transport", "Transport": "transport",
    "new_pipeline_groups": "transport",
}

__all__ = sorted([
    "DEFAULT_TIMEOUT_S", "NonFiniteLossError", "PipelineBrokenError", "PipelineConfigError", "PipelineOptions",
    "PipelinePeerError", "PipelineRuntimeError", "PipelineTimeoutError", *_LAZY,
])


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
