"""The DeepSpeed example's model as DeepSpeed layer specs: embeddings, pre-norm transformer blocks of plain
torch layers, a final norm and an output head tied to the token embedding; and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VOCAB", "TokenEmbedding", "lm_head", "PositionEmbedding", "Block", "lm_loss", "layer_specs"]

VOCAB = 128
"""Tokens are the bytes of an ASCII corpus."""


class TokenEmbedding(nn.Module):
    """``weight[ids]``; the same module (through a TiedLayerSpec) is the output head ``h @ weight.T``."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) int64 -> (B, T, D)
        return F.embedding(ids, self.weight)


def lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The tied output use of the embedding: (B, T, D) -> (B, T, V) logits."""
    return F.linear(hidden, embedding.weight)


class PositionEmbedding(nn.Module):
    def __init__(self, seq_len: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(seq_len, hidden) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        return x + self.weight[: x.shape[1]]


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(hidden, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, in fp32 so bf16 runs report comparable losses."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def layer_specs(args) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec("embed", TokenEmbedding, VOCAB, args.hidden),
        LayerSpec(PositionEmbedding, args.seq_len, args.hidden),
        *[LayerSpec(Block, args.hidden, args.heads) for _ in range(args.layers)],
        LayerSpec(nn.LayerNorm, args.hidden),
        TiedLayerSpec("embed", TokenEmbedding, VOCAB, args.hidden, forward_fn=lm_head),
    ]
