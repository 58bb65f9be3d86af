"""The words of point-to-point communication: a channel, one operation on it, the handle it returns.

:mod:`~dualpipe_plugin.runtime.transport` carries them over a network; the step's transfers
(:mod:`~dualpipe_plugin.runtime.comm`), the mirror exchange and the collectives
(:mod:`~dualpipe_plugin.runtime.collectives`) are written in them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import torch

__all__ = ["Channel", "P2P", "Work"]


class Channel(IntEnum):
    """Which logical link a transfer uses."""

    ACTIVATION = 0
    GRADIENT = 1


@dataclass(frozen=True, slots=True)
class P2P:
    """One point-to-point operation: send ``tensor`` to, or receive it from, pipeline rank ``peer``."""

    send: bool
    tensor: torch.Tensor
    peer: int
    channel: Channel
    what: str
    """Human description used in errors: the op and micro-batch it serves."""


class Work(Protocol):
    def wait(self, timeout_s: float) -> None: ...

    def is_completed(self) -> bool: ...
