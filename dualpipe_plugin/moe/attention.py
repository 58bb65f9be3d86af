"""Causal multi-head self-attention written out (deterministic CPU kernels, bit-exact reruns)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CausalSelfAttention"]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (b, h, s, hd) each
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # (b, h, s, s)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        attn = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, s, d)
        return self.proj(y)
