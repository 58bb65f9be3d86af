"""Layout-independent parameter names and weights for Megatron-Core GPT chunks.

A local parameter name counts layers and experts from 0 on each rank; the global name does not depend
on how the model is cut into pipeline stages and expert-parallel ranks, so gradients and checkpoints of
two layouts compare key by key, and a weight drawn from a generator seeded by its global name is the
same in every layout. Importing this module imports neither torch nor Megatron-Core.
"""

from __future__ import annotations

import re
import zlib

__all__ = [
    "TIED_EMBEDDING",
    "global_param_names",
    "name_seeded_generator",
    "init_for_training",
    "init_for_comparison",
]

TIED_EMBEDDING = "embedding.word_embeddings.weight"
"""Global name of the word embedding; with tied embeddings the last stage's output-layer copy too."""


def global_param_names(chunk) -> dict[str, str]:
    """``{local parameter name: global name}`` for one model chunk (optionally DDP-wrapped).

    Global names use the transformer layer's own ``layer_number`` (1-based, offset included) minus one and
    the expert's global index; when the word embedding is tied, the last stage's ``output_layer.weight``
    copy is named like the embedding.
    """
    from megatron.core import parallel_state

    module = getattr(chunk, "module", chunk)
    layer_numbers = [layer.layer_number - 1 for layer in module.decoder.layers]
    names: dict[str, str] = {}
    for name, _ in module.named_parameters():
        global_name = name
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            global_name = f"decoder.layers.{layer_numbers[int(match.group(1))]}.{match.group(2)}"
        match = re.match(r"(.*\.local_experts)\.(\d+)\.(.*)", global_name)
        if match:
            mlp = module.decoder.layers[int(re.match(r"decoder\.layers\.(\d+)", name).group(1))].mlp
            num_local = mlp.num_local_experts
            ep_rank = parallel_state.get_expert_model_parallel_rank()
            global_name = f"{match.group(1)}.{ep_rank * num_local + int(match.group(2))}.{match.group(3)}"
        if name == "output_layer.weight" and module.share_embeddings_and_output_weights:
            global_name = TIED_EMBEDDING
        names[name] = global_name
    return names


def name_seeded_generator(seed: int, name: str):
    """A ``torch.Generator`` seeded by (``seed``, ``name``): the same draws wherever ``name`` lives."""
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def init_for_training(chunk, seed: int, *, shard: int = 0) -> None:
    """Weights ~ N(0, 0.02), norm weights 1, biases 0, each drawn by its global name: every schedule and
    pipeline/expert layout starts from the same model (``--layout-independent-init``). ``shard`` is the
    tensor-parallel rank: with TP > 1 each rank draws its own shard (by name and shard), so layouts with the
    same TP size start equal."""
    import torch

    names = global_param_names(chunk)
    with torch.no_grad():
        for local_name, param in chunk.named_parameters():
            name = names[local_name]
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                key = name if shard == 0 else f"{name}@tp{shard}"
                param.copy_(0.02 * torch.randn(param.shape, generator=name_seeded_generator(seed, key)))


def init_for_comparison(chunk, seed: int) -> None:
    """Every parameter, norms and biases included, gets its own noise drawn by its global name (norm
    weights 1 + 0.1·N, other parameters 0.05·N), so a gradient comparison between layouts exercises all
    of them."""
    import torch

    module = getattr(chunk, "module", chunk)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for local, global_name in global_param_names(module).items():
            param = params[local]
            noise = torch.randn(param.shape, generator=name_seeded_generator(seed, global_name), dtype=torch.float32)
            if "layernorm" in global_name or "norm." in global_name:
                value = (1.0 if global_name.endswith("weight") else 0.0) + 0.1 * noise
            else:
                value = 0.05 * noise
            param.copy_(value.to(param.dtype))
