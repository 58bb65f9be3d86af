"""A reference MoE transformer whose blocks are cut into sub-stages for the overlap engine.

Attention, a top-k router and experts spread over an expert-parallel (EP) process group; tokens go to
their experts and back with ``all_to_all_single`` (uneven split sizes, zero allowed). Each block is
four sub-stages - attn (compute), dispatch (comm), experts (compute), combine (comm) - implementing the
protocol of :mod:`dualpipe_plugin.runtime.staged`, so an F&B pair of two chunks of these blocks hides
one chunk's all-to-all behind the other's compute (:mod:`dualpipe_plugin.runtime.overlap`).

The EP group is orthogonal to the pipeline group: it joins the ranks at the same pipeline stage of
different data-parallel replicas (an all-to-all across the pipeline's own ranks would deadlock, as they
run staggered). P pipeline stages × EP replicas = P·EP processes.
"""

from dualpipe_plugin.moe.block import MoEBlock
from dualpipe_plugin.moe.chunk import Embedding, Head, MoEModel, lm_loss, moe_chunks, moe_layers
from dualpipe_plugin.moe.config import MoEConfig, MoEConfigError
from dualpipe_plugin.moe.dispatcher import ExpertParallel, new_expert_parallel
from dualpipe_plugin.moe.router import TopKRouter, route

__all__ = [
    "MoEBlock", "MoEConfig", "MoEConfigError", "MoEModel", "Embedding", "Head", "ExpertParallel", "TopKRouter",
    "route", "lm_loss", "moe_chunks", "moe_layers", "new_expert_parallel",
]
