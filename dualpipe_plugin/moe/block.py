"""The reference MoE transformer block, cut into the four sub-stages the overlap engine interleaves.

::

    h ──attn (COMPUTE)──> a = h + Attn(LN1(h));  x = LN2(a);  (w, e) = top-k router(x);  sort copies by expert
      ──dispatch (COMM)─> exchange counts, all_to_all_single [x | w] rows to the experts' ranks
      ──experts (COMPUTE)> y = w * Expert_e(x) for the rows each local expert received
      ──combine (COMM)──> all_to_all_single y back; h' = a + Σ_k y  (un-permute, sum the k copies)

Tuples between sub-stages (N = b·s tokens, k = top_k, E experts, G ranks in the EP group, L = E/G,
R = rows this rank receives)::

    attn     (h)                           -> (a, xw [N·k, d+1], tokens [N·k], counts [E])
    dispatch (a, xw, tokens, counts)       -> (a, rows [R, d+1+P], tokens, counts, recv_counts [G, L])
    experts  (a, rows, tokens, counts, rc) -> (a, y [R, d], tokens, counts, rc)
    combine  (a, y, tokens, counts, rc)    -> (h' [b, s, d],)

``a`` (the residual) passes through dispatch and experts untouched; integer tensors get no gradient.
The router's weights travel with the tokens (the last column of ``xw``), so their gradient comes back
through dispatch⁻¹ like the tokens'. Attention, router and experts are plain ``nn.Linear`` layers, so the
executor's W store splits their weight gradients; the layer norms compute theirs in the input part.
"""

from __future__ import annotations

import torch
from torch import nn

from dualpipe_plugin.moe.attention import CausalSelfAttention
from dualpipe_plugin.moe.config import MoEConfig
from dualpipe_plugin.moe.dispatcher import ExpertParallel
from dualpipe_plugin.moe.experts import Expert, LocalExperts
from dualpipe_plugin.moe.router import TopKRouter, route
from dualpipe_plugin.runtime.staged import ComputeStage, Handle, StageKind, StageState, Tensors

__all__ = ["MoEBlock"]


class MoEBlock(nn.Module):
    """One attention + MoE block; this EP rank holds experts ``[rank·L, (rank+1)·L)``.

    All ``num_experts`` experts are initialised on every rank (the same random draws everywhere, so a
    model built from one seed is the same model at any EP size) and only the local ones are kept.
    Use it as a part of a :class:`~dualpipe_plugin.runtime.staged.StagedChunk`.
    """

    def __init__(self, config: MoEConfig, ep: ExpertParallel | None = None):
        super().__init__()
        self.config = config
        self.ep = ExpertParallel() if ep is None else ep
        local = config.local_experts(self.ep.size)
        self.norm1 = nn.LayerNorm(config.dim)
        self.attention = CausalSelfAttention(config.dim, config.heads)
        self.norm2 = nn.LayerNorm(config.dim)
        self.router = TopKRouter(config.dim, config.num_experts, config.top_k)
        every = [Expert(config.dim, config.ffn_dim) for _ in range(config.num_experts)]
        first = self.ep.rank * local
        self.experts = LocalExperts(every[first : first + local], first)

    def sub_stages(self):
        return (
            ComputeStage("attn", self._attn),
            _Dispatch(self.ep, self.config),
            ComputeStage("experts", self._experts),
            _Combine(self.ep, self.config),
        )

    # -- compute sub-stages --------------------------------------------------------------------------
    def _attn(self, h: torch.Tensor):
        a = h + self.attention(self.norm1(h))
        x = self.norm2(a).reshape(-1, self.config.dim)  # (N, d)
        weights, experts = self.router(x)  # (N, k) each
        routing = route(experts, self.config.num_experts)
        xw = torch.cat([x.index_select(0, routing.tokens), weights.reshape(-1, 1).index_select(0, routing.order)], 1)
        return a, xw, routing.tokens, routing.counts

    def _experts(self, a, rows, tokens, counts, recv_counts):
        d = self.config.dim
        y = self.experts(rows[:, :d], recv_counts.tolist()) * rows[:, d : d + 1]
        return a, y, tokens, counts, recv_counts


def _splits(counts: torch.Tensor, size: int) -> list[int]:
    """Rows per rank of the group from per-expert counts ([E] or [G, L]) ordered by rank."""
    return counts.reshape(size, -1).sum(1).tolist()


class _Dispatch:
    """COMM: counts exchange, then [x | w] rows to the ranks holding their experts."""

    name = "dispatch"
    kind = StageKind.COMM

    def __init__(self, ep: ExpertParallel, config: MoEConfig):
        self.ep, self.pad = ep, config.wire_padding

    def forward(self, state: StageState, inputs: Tensors) -> Handle:
        a, xw, tokens, counts = inputs
        recv_counts = self.ep.exchange_counts(counts)
        state.send, state.recv = _splits(counts, self.ep.size), _splits(recv_counts, self.ep.size)
        state.width, state.device = xw.shape[1], xw.device
        wants_grad = xw.requires_grad

        def received(rows: torch.Tensor) -> Tensors:
            return a, rows.requires_grad_(wants_grad), tokens, counts, recv_counts

        with torch.no_grad():
            return self.ep.start(xw, state.send, state.recv, received, ballast=self.pad)

    def backward(self, state: StageState, grads: Tensors) -> Handle:
        grad_a, grad_rows = grads[0], grads[1]
        if grad_rows is None:  # no row reached an expert that needs a gradient: still take part
            grad_rows = torch.zeros(sum(state.recv), state.width, device=state.device)

        def received(rows: torch.Tensor) -> Tensors:
            return grad_a, rows, None, None

        return self.ep.start(grad_rows, state.recv, state.send, received, ballast=self.pad)


class _Combine:
    """COMM: expert outputs back to their tokens' ranks; un-permute, sum the k copies, add the residual."""

    name = "combine"
    kind = StageKind.COMM

    def __init__(self, ep: ExpertParallel, config: MoEConfig):
        self.ep, self.pad, self.dim = ep, config.wire_padding, config.dim

    def forward(self, state: StageState, inputs: Tensors) -> Handle:
        a, y, tokens, counts, recv_counts = inputs
        state.send, state.recv = _splits(recv_counts, self.ep.size), _splits(counts, self.ep.size)
        state.tokens, state.shape = tokens, a.shape
        wants_grad = a.requires_grad or y.requires_grad
        dim = self.dim

        def received(rows: torch.Tensor) -> Tensors:
            with torch.no_grad():
                moe = rows.new_zeros(a.numel() // dim, dim).index_add_(0, tokens, rows)
                return ((a + moe.view(a.shape)).requires_grad_(wants_grad),)

        with torch.no_grad():
            return self.ep.start(y, state.send, state.recv, received, ballast=self.pad)

    def backward(self, state: StageState, grads: Tensors) -> Handle:
        (grad_h,) = grads
        if grad_h is None:
            grad_h = torch.zeros(state.shape, device=state.tokens.device)
        grad_rows = grad_h.reshape(-1, self.dim).index_select(0, state.tokens)

        def received(rows: torch.Tensor) -> Tensors:
            return grad_h, rows, None, None, None

        return self.ep.start(grad_rows, state.recv, state.send, received, ballast=self.pad)
