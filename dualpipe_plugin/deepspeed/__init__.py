"""DeepSpeed adapter: ``import dualpipe_plugin.deepspeed`` and set ``"pipeline": {"schedule": ...}``.

>>> import deepspeed
>>> import dualpipe_plugin.deepspeed          # registers the schedules with DeepSpeed
>>> model = deepspeed.pipe.PipelineModule(layers=specs, num_stages=P, loss_fn=loss_fn)
>>> engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
>>> loss = engine.train_batch(data_iter)      # ds_config["pipeline"] = {"schedule": "dualpipev", "overlap": True}

What the import changes (DeepSpeed has no engine registry; this is the narrowest point it offers):

* ``deepspeed.PipelineEngine``, the module global that ``deepspeed.initialize`` looks up when it is
  given a ``PipelineModule``, becomes :class:`DualPipeEngine`, a subclass of DeepSpeed's
  ``PipelineEngine``. Without a ``"schedule"`` key (or with ``"deepspeed"``) every method of the subclass
  defers to DeepSpeed's, so training is bit for bit what it was.
* ``deepspeed.DualPipeVEngine``, the global it looks up for DeepSpeed's own ``DualPipeVModule``, becomes
  :class:`~dualpipe_plugin.deepspeed.v_module.CheckedDualPipeVEngine`: the same engine, refusing a config
  whose ``"schedule"`` names one of this plugin's schedules (it would be ignored).
* ``PipelineModule._partition_layers`` is wrapped by an observer that records the ``partition_method``
  the module was built with (DeepSpeed does not keep it), so the engine can cut the same spec list into
  2P stages with the same method. The wrapped call itself is unchanged.

:func:`unregister` undoes all three; :func:`register` (run on import) is idempotent. Launch as any DeepSpeed
job (``deepspeed``, ``torchrun``, ``srun``): the adapter uses DeepSpeed's process groups and topology.
"""

from __future__ import annotations

import functools

import deepspeed
from deepspeed.runtime.pipe.dualpipev import DualPipeVEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

from dualpipe_plugin.deepspeed.config import (
    DEEPSPEED_SCHEDULE,
    DeepSpeedPipelineConfigError,
    read_partition_method,
    read_pipeline_options,
)
from dualpipe_plugin.deepspeed.engine import DualPipeEngine
from dualpipe_plugin.deepspeed.layout import _METHOD_ATTR
from dualpipe_plugin.deepspeed.v_module import CheckedDualPipeVEngine

__all__ = [
    "DEEPSPEED_SCHEDULE",
    "DeepSpeedPipelineConfigError",
    "CheckedDualPipeVEngine",
    "DualPipeEngine",
    "is_registered",
    "read_partition_method",
    "read_pipeline_options",
    "register",
    "unregister",
]

_STOCK_ENGINE = PipelineEngine
_STOCK_V_ENGINE = DualPipeVEngine
_STOCK_PARTITION = getattr(PipelineModule.__dict__["_partition_layers"], "__wrapped__", PipelineModule.__dict__["_partition_layers"])


@functools.wraps(_STOCK_PARTITION)
def _recording_partition_layers(self, method="uniform"):
    self.__dict__[_METHOD_ATTR] = method
    return _STOCK_PARTITION(self, method)


def is_registered() -> bool:
    return deepspeed.PipelineEngine is DualPipeEngine


def register() -> None:
    """Make ``deepspeed.initialize`` build :class:`DualPipeEngine` for PipelineModules (idempotent)."""
    current = deepspeed.PipelineEngine
    if current is not DualPipeEngine and current is not _STOCK_ENGINE:
        raise RuntimeError(
            f"deepspeed.PipelineEngine is already replaced by {current.__module__}.{current.__qualname__}; "
            f"dualpipe_plugin.deepspeed cannot register over another plugin's engine"
        )
    deepspeed.PipelineEngine = DualPipeEngine
    if deepspeed.DualPipeVEngine is _STOCK_V_ENGINE:
        deepspeed.DualPipeVEngine = CheckedDualPipeVEngine
    PipelineModule._partition_layers = _recording_partition_layers


def unregister() -> None:
    """Give ``deepspeed.initialize`` DeepSpeed's own ``PipelineEngine`` back (engines already built keep working)."""
    if deepspeed.PipelineEngine is DualPipeEngine:
        deepspeed.PipelineEngine = _STOCK_ENGINE
    if deepspeed.DualPipeVEngine is CheckedDualPipeVEngine:
        deepspeed.DualPipeVEngine = _STOCK_V_ENGINE
    if PipelineModule.__dict__.get("_partition_layers") is _recording_partition_layers:
        PipelineModule._partition_layers = _STOCK_PARTITION


register()
