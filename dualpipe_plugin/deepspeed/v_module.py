"""DeepSpeed's own ``DualPipeVModule`` next to this plugin's ``"schedule"`` key: one clear error, never silent.

``deepspeed.initialize`` builds DeepSpeed's ``DualPipeVEngine`` for a ``DualPipeVModule`` (it looks the
class up as the module global ``deepspeed.DualPipeVEngine``), so :class:`DualPipeEngine` never sees that
model and the config's ``"pipeline": {"schedule": ...}`` would be ignored: DeepSpeed's V schedule would
run, not the one asked for. The registration puts :class:`CheckedDualPipeVEngine` in that global: the same
engine, which first refuses a config that names one of this plugin's schedules. ``"schedule":
"deepspeed"`` (or no key) keeps DeepSpeed's DualPipeVEngine as it is.
"""

from __future__ import annotations

from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine

from dualpipe_plugin.deepspeed.config import DeepSpeedPipelineConfigError, pipeline_section, read_pipeline_options

__all__ = ["CheckedDualPipeVEngine"]


class CheckedDualPipeVEngine(DualPipeVEngine):
    """DeepSpeed's ``DualPipeVEngine``, refusing a config whose ``pipeline.schedule`` it would ignore."""

    def __init__(self, *args, **kwargs):
        options = read_pipeline_options(pipeline_section(dict(kwargs)))
        if options is not None:
            raise DeepSpeedPipelineConfigError(
                f"pipeline.schedule={options.schedule.name!r} is not run for a DualPipeVModule: deepspeed.initialize "
                f"gives that model DeepSpeed's own DualPipeVEngine, which ignores the key. To run this plugin's "
                f"schedule build the model as deepspeed.pipe.PipelineModule (same layers, num_stages = pipeline "
                f"ranks; the plugin cuts the V itself); to run DeepSpeed's DualPipeVEngine remove \"schedule\" from "
                f"the config's \"pipeline\" section"
            )
        super().__init__(*args, **kwargs)
