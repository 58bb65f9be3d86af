"""This rank's experts: per-expert MLPs applied to the tokens received from every rank of the EP group."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Expert", "LocalExperts"]


class Expert(nn.Module):
    """``fc2(gelu(fc1(x)))``: plain ``nn.Linear`` layers, so the executor's W store splits their gradients."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class LocalExperts(nn.Module):
    """Experts ``first .. first + count - 1`` of a block (global numbering), held by this EP rank."""

    def __init__(self, experts: list[Expert], first: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.first = first

    def forward(self, rows: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        """rows [R, d], grouped by source rank then local expert with ``counts[src][expert]`` rows each.

        Each expert sees its rows from every source in source order (one matmul per expert); the result
        comes back in the received order. Experts with no rows are skipped (no gradient this micro-batch).
        """
        local = len(self.experts)
        flat = [n for per_source in counts for n in per_source]
        pieces = torch.split(rows, flat)
        outputs: list[torch.Tensor | None] = [None] * len(flat)
        for e, expert in enumerate(self.experts):
            slots = [src * local + e for src in range(len(counts))]
            sizes = [flat[i] for i in slots]
            if sum(sizes) == 0:
                for i in slots:
                    outputs[i] = rows.new_zeros(0, rows.shape[1])
                continue
            for i, y in zip(slots, torch.split(expert(torch.cat([pieces[i] for i in slots])), sizes)):
                outputs[i] = y
        return torch.cat(outputs) if outputs else rows.new_zeros(0, rows.shape[1])
