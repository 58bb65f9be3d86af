"""Facts recorded next to every benchmark result: when, where, and how busy the machine was."""

from __future__ import annotations

import datetime
import os
import platform

__all__ = ["machine_facts"]


def machine_facts() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_1m_5m_15m": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
