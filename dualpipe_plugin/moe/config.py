"""The reference MoE model's configuration and its user errors."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MoEConfig", "MoEConfigError"]


class MoEConfigError(ValueError):
    """A bad MoE configuration: the message says which rule broke and how to fix it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """Sizes of the reference MoE transformer (small defaults: tests and the emulated device)."""

    dim: int = 32
    """Hidden size of the residual stream."""
    heads: int = 4
    """Attention heads; must divide ``dim``."""
    num_experts: int = 8
    """Experts per block, spread evenly over the expert-parallel group."""
    top_k: int = 2
    """Experts each token is routed to (1 <= top_k <= num_experts)."""
    ffn_dim: int = 64
    """Hidden size of each expert's MLP."""
    vocab_size: int = 64
    """Vocabulary of the embedding (first stage) and the head (last stage)."""
    wire_padding: int = 0
    """Zero columns per token sent along with dispatch and combine (a second transfer from a cached
    buffer). The emulated device uses it to give the all-to-all a realistic volume without the math of a
    wide model; 0 for real use."""

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "num_experts", "top_k", "ffn_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise MoEConfigError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise MoEConfigError(
                f"MoEConfig.dim={self.dim} is not divisible by heads={self.heads}; pick heads dividing dim"
            )
        if self.top_k > self.num_experts:
            raise MoEConfigError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot go to more "
                f"experts than exist; lower top_k or add experts"
            )
        if self.wire_padding < 0:
            raise MoEConfigError(f"MoEConfig.wire_padding must be >= 0, got {self.wire_padding}")

    def local_experts(self, ep_size: int) -> int:
        """Experts per rank of an expert-parallel group of ``ep_size`` ranks (raises if it does not divide)."""
        if ep_size < 1 or self.num_experts % ep_size:
            raise MoEConfigError(
                f"num_experts={self.num_experts} experts cannot be spread evenly over an expert-parallel group "
                f"of {ep_size} ranks; use a group size dividing num_experts (or a multiple of it as num_experts)"
            )
        return self.num_experts // ep_size
