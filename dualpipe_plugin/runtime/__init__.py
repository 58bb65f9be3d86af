"""The runtime: executes any schedule of :mod:`dualpipe_plugin.schedules` on ``torch.distributed``.

Standalone entry points are re-exported here; the framework adapters use :class:`PipelineExecutor`.
"""

from dualpipe_plugin.runtime.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from dualpipe_plugin.runtime.errors import (
    NonFiniteLossError,
    PipelineConfigError,
    PipelinePeerError,
    PipelineRuntimeError,
    PipelineTimeoutError,
)
from dualpipe_plugin.runtime.executor import PipelineExecutor, StageHooks, StepOutcome
from dualpipe_plugin.runtime.pipeline import DualPipeline, StepResult, split_stages, stage_modules
from dualpipe_plugin.runtime.transport import Channel, TorchTransport, Transport, new_pipeline_groups

__all__ = [
    "Channel", "CheckpointError", "NonFiniteLossError", "DualPipeline", "PipelineConfigError", "PipelineExecutor", "PipelinePeerError",
    "PipelineRuntimeError", "PipelineTimeoutError", "StageHooks", "StepOutcome", "StepResult", "TorchTransport",
    "Transport", "latest_checkpoint", "load_checkpoint", "new_pipeline_groups", "save_checkpoint", "split_stages",
    "stage_modules",
]
