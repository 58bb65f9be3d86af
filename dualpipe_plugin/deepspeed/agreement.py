"""One refusal on every rank of a pipeline: what the ranks found, agreed with one collective.

A check that can fail on some ranks only (after ``initialize`` re-partitions the layers, each rank holds
other layers and other optimizer groups) must still fail on all of them: a rank that carries on waits in
DeepSpeed's next collective until its timeout. :func:`first_problem_in_pipeline` gathers each rank's
problem (or None) over the pipeline group and returns the lowest rank's, the same text everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["first_problem_in_pipeline"]


def first_problem_in_pipeline(problem: str | None, group: Any) -> str | None:
    """The first problem any rank of ``group`` found, in rank order (None if none did). Collective."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, problem, group=group)
    return next((found for found in gathered if found is not None), None)
