"""Top-k router: which experts each token goes to, with what weight, and the token permutation for dispatch."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dualpipe_plugin.moe.config import MoEConfigError

__all__ = ["TopKRouter", "Routing", "route"]


class Routing(NamedTuple):
    """Where the ``N * top_k`` token copies go, sorted by expert (stable: token order within an expert)."""

    order: torch.Tensor
    """[N*k] int64: flat copy index (token * k + slot) of each position in expert order."""
    tokens: torch.Tensor
    """[N*k] int64: the token of each position (``order // k``)."""
    counts: torch.Tensor
    """[E] int64: copies per expert (zeros allowed)."""


class TopKRouter(nn.Module):
    """``softmax(x @ W)`` over the experts, then the top ``k`` probabilities (not renormalised)."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise MoEConfigError(
                f"top_k={top_k} must be between 1 and num_experts={num_experts}; lower top_k or add experts"
            )
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] float, experts [N, k] int64)."""
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights, experts


def route(experts: torch.Tensor, num_experts: int) -> Routing:
    """Sort the token copies of ``experts`` [N, k] by expert; count the copies per expert."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return Routing(order, order // experts.shape[1], counts)
