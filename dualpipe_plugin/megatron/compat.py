"""The Megatron-Core releases this adapter supports, and the few places where they differ.

Tested lines: megatron-core 0.16.1 (Python 3.11; ships ``megatron.core`` only) and 0.19.2 (Python 3.12;
its wheel also ships Megatron-LM's ``megatron.training``: ``pretrain()``, arguments, checkpointing).
One adapter serves both; where an API moved, the shim is here, named after what it does, and answers
by what the installed package has rather than by a version string where it can.
"""

from __future__ import annotations

import functools
import importlib.util
import re

__all__ = [
    "megatron_core_version",
    "reset_moe_metrics",
    "ships_megatron_training",
]


@functools.lru_cache(maxsize=1)
def megatron_core_version() -> tuple[int, int, int]:
    """The installed megatron-core's (major, minor, patch)."""
    from megatron.core import package_info

    numbers = [int(part) for part in re.findall(r"\d+", package_info.__version__)[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def ships_megatron_training() -> bool:
    """True when the installed wheel ships Megatron-LM's ``megatron.training`` (megatron-core >= 0.19)."""
    if megatron_core_version() < (0, 19):
        return False
    try:
        return importlib.util.find_spec("megatron.training.initialize") is not None
    except (ImportError, ValueError):
        return False


def reset_moe_metrics() -> None:
    """Forget Megatron's process-wide per-layer MoE metrics (sized by the first model that records them).

    0.19 keeps them in a ``MoEMetricsTracker`` (``moe_logging``), which is dropped and re-created lazily;
    its ``clear()`` only zeroes values, and ``get_moe_layer_wise_logging_tracker()`` there returns a copy.
    0.16 keeps a module-level dict, cleared in place.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    else:
        destroy_moe_metrics_tracker()
