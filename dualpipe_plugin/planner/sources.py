"""Turning a framework's model into the row of layers the profiler runs (see :class:`ProfileTarget`).

* DeepSpeed: :func:`pipeline_module_layers` builds every layer spec of a ``PipelineModule`` on this
  process, in spec order (a ``LayerSpec`` is built, a module taken as it is, a ``TiedLayerSpec`` built
  once per key and called through its ``forward_fn``), so profile layer i is spec i and the cuts are
  the ``boundaries:`` of ``pipeline.partition_method``. The module's ``loss_fn`` ends the row.
* Megatron-Core: :func:`megatron_layers` builds the whole model from Megatron-LM's ``model_provider``
  (pre- and post-process on this process: initialise ``parallel_state`` with pipeline size 1 first),
  runs it once to learn the arguments each transformer layer receives, and profiles three kinds of
  pieces: the embedding (attached to the first transformer layer, as Megatron builds it), each
  ``decoder.layers[i]``, and the head (final norm, output layer, loss; attached to the last layer).
  The B/W split binds Megatron's own linears as the Megatron adapter does. The cuts are transformer
  layers per stage: ``configure_model_config(..., stage_layers=...)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["pipeline_module_layers", "megatron_layers"]


# ------------------------------------------------------------------------------------------ DeepSpeed


def pipeline_module_layers(cls, module: Any, inputs: Any, labels: Any = None, *, model: str = ""):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    layers, names, tied = [], [], {}
    for index, spec in enumerate(module._layer_specs):
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
            built = tied[spec.key]
            layer = functools.partial(spec.forward_fn, built) if spec.forward_fn is not None else built
            name = f"{index}: {spec.typename.__name__} (tied {spec.key!r})"
        elif isinstance(spec, LayerSpec):
            layer = spec.build()
            name = f"{index}: {spec.typename.__name__}"
        else:
            layer = spec
            name = f"{index}: {getattr(spec, '__name__', type(spec).__name__)}"
        layers.append(layer)
        names.append(name)
    loss = None
    if module.loss_fn is not None and labels is not None:
        loss = functools.partial(_pipeline_loss, module.loss_fn, labels)
    return cls(layers=layers, inputs=inputs, loss=loss, names=names, source="deepspeed",
               model=model or f"PipelineModule of {len(layers)} layer specs")


def _pipeline_loss(loss_fn: Callable, labels: Any, output: Any) -> torch.Tensor:
    return loss_fn(output, labels)


# ------------------------------------------------------------------------------------------- Megatron


class _Embedding(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.embedding = model.embedding

    def forward(self, batch: tuple) -> torch.Tensor:
        tokens, position_ids = batch
        return self.embedding(input_ids=tokens, position_ids=position_ids)


class _Layer(nn.Module):
    """One transformer layer called with the arguments the decoder gave it, hidden states aside."""

    def __init__(self, layer: nn.Module, kwargs: dict):
        super().__init__()
        self.layer = layer
        self.kwargs = kwargs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = self.layer(hidden_states=hidden, **self.kwargs)
        return output[0] if isinstance(output, tuple) else output


class _Head(nn.Module):
    """Final norm, output layer and the per-token loss, masked and averaged as Megatron-LM's loss_func."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, loss_mask: torch.Tensor):
        super().__init__()
        self.norm = model.decoder.final_layernorm
        self.output_layer = model.output_layer
        self.model = [model]  # not a submodule: only its loss function is used
        # A tied output layer uses the embedding's weight; a pipeline stage holding the head keeps a copy.
        self.tied_weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        self.labels, self.loss_mask = labels, loss_mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        model = self.model[0]
        if self.norm is not None:
            hidden = self.norm(hidden)
        logits, _ = self.output_layer(hidden, weight=self.tied_weight)
        losses = model.compute_language_model_loss(self.labels, logits).float()
        mask = self.loss_mask.float()
        return (losses.view(-1) * mask.view(-1)).sum() / mask.sum()


def megatron_layers(cls, model_provider: Callable[..., Any], config: Any, batch: dict, *, model: str = ""):
    """``batch`` holds ``tokens``, ``position_ids``, ``labels`` and ``loss_mask`` of one micro-batch."""
    from dualpipe_plugin.megatron.weight_split import bind_megatron_linears

    built = model_provider(pre_process=True, post_process=True, vp_stage=None)
    layers = list(built.decoder.layers)
    captured: dict[int, dict] = {}

    def capture(index):
        def hook(module, args, kwargs):
            captured[index] = {key: value for key, value in kwargs.items() if key != "hidden_states"}

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            built(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    finally:
        for handle in handles:
            handle.remove()
    pieces = [_Embedding(built)] + [_Layer(layer, captured[i]) for i, layer in enumerate(layers)]
    pieces.append(_Head(built, batch["labels"], batch["loss_mask"]))
    names = ["embedding"] + [f"decoder.layers.{i}" for i in range(len(layers))] + ["output (norm, output layer, loss)"]
    attach = ["next"] + [None] * len(layers) + ["previous"]
    return cls(layers=pieces, inputs=(batch["tokens"], batch["position_ids"]), loss=_identity, names=names,
               attach=attach, source="megatron", model=model or f"Megatron GPT, {len(layers)} transformer layers",
               weight_splitters=(bind_megatron_linears,))


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value
