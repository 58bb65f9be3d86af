"""Megatron-Core's TransformerLayer (MoE with the alltoall dispatcher, or dense) on the overlap protocol.

>>> from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk
>>> chunk = megatron_staged_chunk(gpt_model)             # a StagedChunk; chunk(ids, pos) == gpt_model(ids, pos, None)
>>> first = megatron_staged_chunk(gpt_model, layers=slice(0, 2))   # embedding + layers 0-1
>>> last = megatron_staged_chunk(gpt_model, layers=slice(2, 4))    # layers 2-3 + final norm + output layer
>>> pipe = DualPipeline([first, last], "dualpipev", loss_fn=..., transport=...)   # F&B pairs overlap

With the chunks built this way, the overlap engine (:mod:`dualpipe_plugin.runtime.overlap`) hides one
chunk's expert-parallel all-to-all behind the other chunk's compute inside every F&B pair, as Megatron's
own ``combined_1f1b`` does for its interleaved schedule (``models/gpt/fine_grained_callables.py``), but
on one thread with ``async_op=True`` transfers instead of two CUDA streams.

One MoE :class:`~megatron.core.transformer.transformer_layer.TransformerLayer` becomes five sub-stages
(:class:`MegatronLayerStages`), each a call of Megatron's own methods, in the order of
``TransformerLayer.forward`` -> ``MoELayer.forward``::

    attn      COMPUTE  layer._forward_attention, _forward_pre_mlp_layernorm, mlp.shared_experts_compute,
                       mlp.route (router + aux loss), mlp.preprocess (dispatcher.dispatch_preprocess:
                       split sizes, the counts all-gather over tp_ep, permutation 1)
    dispatch  COMM     the dispatcher's token_dispatch, done here: all_to_all_single of the permuted tokens
                       and of their probs over dispatcher.ep_group with (output_splits, input_splits),
                       launched with async_op=True
    experts   COMPUTE  mlp.routed_experts_compute (dispatch_postprocess, experts, combine_preprocess)
    combine   COMM     token_combine, done here: all_to_all_single back with (input_splits, output_splits)
    post      COMPUTE  mlp.postprocess (combine_postprocess: un-permute; + shared experts),
                       layer._forward_post_mlp (bias-dropout-add with the residual, viewless output)

Tuples between sub-stages (``ctx`` is a :class:`LayerContext` or None, ``meta`` a snapshot of the
dispatcher's per-forward attributes, see [Note: dispatcher state])::

    attn      (h[, ctx])                                   -> (residual, tokens, probs, shared, meta, ctx)
    dispatch  (residual, tokens, probs, shared, meta, ctx) -> (residual, tokens', probs', shared, meta, ctx)
    experts   (residual, tokens', probs', shared, meta, ctx) -> (residual, y, shared, meta, ctx)
    combine   (residual, y, shared, meta, ctx)             -> (residual, y', shared, meta, ctx)
    post      (residual, y', shared, meta, ctx)            -> (h'[, ctx])

A dense layer (``mlp`` is not a ``MoELayer``) is one COMPUTE sub-stage calling the layer itself.

Exactness. Every sub-stage runs Megatron's own code on the same tensors in the same order, and the two
transfers move the same rows with the same split sizes and group as Megatron's ``_AllToAll`` (whose
backward is the reverse all-to-all, written here by hand), so forward outputs and every gradient are
bit-identical to ``TransformerLayer.forward`` + autograd (``tests/megatron/test_moe_overlap.py``).

[Note: dispatcher state] ``MoEAlltoAllTokenDispatcher`` keeps one forward's metadata on ``self`` (split
sizes, the permutation mapping, the routing map, shapes) from ``dispatch_preprocess`` until
``combine_postprocess``. The protocol keeps per-forward state out of modules; so ``attn`` snapshots those
attributes into ``meta`` and every later sub-stage restores them before calling the dispatcher. Two
forwards of the same layer may then interleave (the engine never does that today; Megatron's
``combined_1f1b`` relies on it never happening).

Scope. Refused at construction (:class:`MegatronOverlapError` names the setting and the fix): token
dispatchers other than alltoall (allgather, flex/DeepEP); ``moe_shared_expert_overlap`` (that shared
expert runs inside the dispatcher across sub-stages); full recompute and the selective recompute of the
MoE layer, the MLP or the pre-MLP layernorm (their checkpoints span sub-stages); CUDA graphs; fp8 / fp4;
fine-grained activation offloading; CPU offloading; multi-token prediction.

Checked bit-exact on CPU/gloo (``tests/megatron/test_moe_overlap.py``): TP=1, EP=1 and EP=2, top-1 and
top-2 routing with aux loss, zero-row splits, shared experts (not overlapped), dense layers,
learned-absolute and RoPE position embeddings, tied and untied output layers, fp32 and bf16 in
``Float16Module``; ``DualPipeline`` dualpipev at P=1 × EP=2 and P=2 × EP=2 against Megatron's own schedule.
Written to Megatron's code but not run here: TP>1 / sequence parallel (``TransformerBlock``'s RNG-tracker
fork is reproduced per sub-stage), expert TP (its all-gather / reduce-scatter run inside ``experts`` as
blocking collectives), token dropping / padding to capacity (``output_splits=None``: equal splits),
Transformer Engine layers and grouped GEMM, NCCL. ``megatron_staged_chunk`` takes ``attention_mask`` and
``labels`` as chunk inputs; ``packed_seq_params``, ``padding_mask``, ``loss_mask`` (GPTModel's, for MTP)
and inference contexts are not supported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.runtime.staged import ComputeStage, Handle, Ready, StageKind, StagedChunk, StageState, Tensors

__all__ = [
    "LayerContext",
    "MegatronLayerStages",
    "MegatronOverlapError",
    "check_layer",
    "megatron_staged_chunk",
]


class MegatronOverlapError(ValueError):
    """A Megatron layer or setting the overlap adapter cannot split into sub-stages (the message says why)."""


@dataclass(frozen=True, slots=True)
class LayerContext:
    """Per-forward side inputs of the layers (what ``TransformerBlock.forward`` passes every layer), plus
    what the output head needs. Travels through the sub-stage tuples; carries no gradient."""

    attention_mask: torch.Tensor | None = None
    rotary_pos_emb: torch.Tensor | None = None
    rotary_pos_cos: torch.Tensor | None = None
    rotary_pos_sin: torch.Tensor | None = None
    sequence_len_offset: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    decoder_input: torch.Tensor | None = None


_NO_CONTEXT = LayerContext()

# [Note: dispatcher state] MoEAlltoAllTokenDispatcher attributes written by one forward and read later in it.
_DISPATCHER_STATE = (
    "hidden_shape", "probs", "routing_map", "tokens_per_expert", "hidden_shape_before_permute",
    "reversed_local_input_permutation_mapping", "num_out_tokens", "input_splits", "output_splits",
    "output_splits_tp", "num_global_tokens_per_local_expert", "capacity", "cuda_sync_point", "d2h_event",
)
_ABSENT = object()


class _DispatcherState:
    """A snapshot of the dispatcher's per-forward attributes ([Note: dispatcher state])."""

    __slots__ = ("values",)

    def __init__(self, dispatcher) -> None:
        self.values = {name: getattr(dispatcher, name, _ABSENT) for name in _DISPATCHER_STATE}

    def restore(self, dispatcher) -> None:
        for name, value in self.values.items():
            if value is not _ABSENT:
                setattr(dispatcher, name, value)


# ------------------------------------------------------------------------------------------ checks


def _is_moe(layer) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(layer.mlp, MoELayer)


def check_layer(layer) -> None:
    """Raise :class:`MegatronOverlapError` (or ``TypeError``) if ``layer`` cannot be split (module doc)."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if not isinstance(layer, TransformerLayer):
        raise TypeError(
            f"expected a megatron.core TransformerLayer, got {type(layer).__name__}; multi-token-prediction "
            f"and other layer types have no sub-stage split here"
        )
    config = layer.config
    refused = [
        (getattr(config, "cuda_graph_impl", "none") != "none", f"cuda_graph_impl={config.cuda_graph_impl!r}",
         "set it to 'none'"),
        (bool(config.fp8) or bool(getattr(config, "fp4", None)), "fp8/fp4", "train in bf16/fp16/fp32"),
        (config.recompute_granularity == "full", "recompute_granularity='full'",
         "use selective recompute (without 'moe', 'mlp', 'layernorm') or none"),
        (bool(getattr(config, "fine_grained_activation_offloading", False)), "fine_grained_activation_offloading",
         "turn it off"),
        (bool(getattr(config, "cpu_offloading", False)), "cpu_offloading", "turn it off"),
        (bool(getattr(layer, "recompute_pre_mlp_layernorm", False)), "recompute of the pre-MLP layernorm",
         "drop 'layernorm' from recompute_modules"),
        (bool(getattr(layer, "recompute_mlp", False)), "recompute of the MLP", "drop 'mlp' from recompute_modules"),
    ]
    if _is_moe(layer):
        mlp = layer.mlp
        dispatcher = mlp.token_dispatcher
        if not isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
            raise MegatronOverlapError(
                f"layer {layer.layer_number}: the overlap adapter supports moe_token_dispatcher_type='alltoall' "
                f"only, this layer uses {type(dispatcher).__name__}; set moe_token_dispatcher_type='alltoall'"
            )
        refused += [
            (bool(config.moe_shared_expert_overlap), "moe_shared_expert_overlap",
             "set it to False (the shared expert then runs in the attn sub-stage)"),
            (bool(getattr(mlp, "moe_layer_recompute", False)), "recompute of the MoE layer",
             "drop 'moe' from recompute_modules"),
        ]
    bad = [(what, fix) for flag, what, fix in refused if flag]
    if bad:
        listed = "; ".join(f"{what} ({fix})" for what, fix in bad)
        raise MegatronOverlapError(f"layer {layer.layer_number} cannot be split into overlap sub-stages: {listed}")


# --------------------------------------------------------------------------------------- transfers


def _split_list(splits) -> list[int] | None:
    """Megatron's split sizes (numpy array, tensor, list or None = equal split) as a list of ints."""
    if splits is None:
        return None
    if hasattr(splits, "tolist"):
        splits = splits.tolist()
    return [int(s) for s in splits]


class _Transfer:
    """Launched ``all_to_all_single`` s; ``wait()`` finishes them and returns ``then(*received)``."""

    __slots__ = ("_works", "_received", "_sent", "_then")

    def __init__(self, works, received, sent, then):
        self._works, self._received, self._sent, self._then = works, received, sent, then

    def wait(self) -> Tensors:
        while self._works:
            self._works.pop(0).wait()
        self._sent = None  # the inputs stay alive until the transfer is done
        return self._then(*self._received)


def _all_to_all(group, tensors, send: list[int] | None, recv: list[int] | None,
                then: Callable[..., Tensors]) -> Handle:
    """Launch one ``all_to_all_single`` per tensor (rows ``send[r]`` to rank r, ``recv[r]`` from it) on
    ``group``, in list order, as Megatron's ``_AllToAll`` would issue them; a group of one moves nothing."""
    if group is None or group.size() == 1:
        return Ready(then(*(t.detach() for t in tensors)))
    received, sent, works = [], [], []
    for tensor in tensors:
        tensor = tensor.detach().contiguous()
        if recv is None:
            out = torch.empty_like(tensor)
        else:
            out = tensor.new_empty((sum(recv),) + tuple(tensor.shape[1:]))
        works.append(dist.all_to_all_single(out, tensor, recv, send, group=group, async_op=True))
        received.append(out)
        sent.append(tensor)
    return _Transfer(works, received, sent, then)


def _zeros_if_none(grad, like: tuple) -> torch.Tensor:
    """``grad``, or zeros of ``like`` = (shape, dtype, device): every rank must take part in the transfer."""
    if grad is not None:
        return grad
    shape, dtype, device = like
    return torch.zeros(shape, dtype=dtype, device=device)


def _like(tensor: torch.Tensor) -> tuple:
    return tensor.shape, tensor.dtype, tensor.device


class _Dispatch:
    """COMM: the dispatcher's token_dispatch (tokens and probs to the experts' ranks), launched async."""

    kind = StageKind.COMM

    def __init__(self, name: str, dispatcher):
        self.name, self.dispatcher = name, dispatcher

    def forward(self, state: StageState, inputs: Tensors) -> Handle:
        residual, tokens, probs, shared, meta, ctx = inputs
        d = self.dispatcher
        meta.restore(d)
        # What token_dispatch does before its all-to-all: the device-to-host sync of the split sizes.
        d.tokens_per_expert = d._maybe_dtoh_and_synchronize("before_ep_alltoall", d.tokens_per_expert)
        meta = _DispatcherState(d)
        send, recv = _split_list(d.input_splits), _split_list(d.output_splits)
        state.send, state.recv = send, recv
        wants = (tokens.requires_grad, probs.requires_grad)

        def received(tokens_out, probs_out) -> Tensors:
            state.like = (_like(tokens_out), _like(probs_out))  # for zero gradients in backward
            return (residual, tokens_out.requires_grad_(wants[0]), probs_out.requires_grad_(wants[1]),
                    shared, meta, ctx)

        with torch.no_grad():
            return _all_to_all(d.ep_group, (tokens, probs), send, recv, received)

    def backward(self, state: StageState, grads: Tensors) -> Handle:
        grad_residual, grad_tokens, grad_probs, grad_shared = grads[:4]
        grad_tokens = _zeros_if_none(grad_tokens, state.like[0])
        grad_probs = _zeros_if_none(grad_probs, state.like[1])
        send, recv = state.send, state.recv
        state.clear()

        def received(tokens_grad, probs_grad) -> Tensors:
            return grad_residual, tokens_grad, probs_grad, grad_shared, None, None

        return _all_to_all(self.dispatcher.ep_group, (grad_tokens, grad_probs), recv, send, received)


class _Combine:
    """COMM: the dispatcher's token_combine (expert outputs back to their tokens' ranks), launched async."""

    kind = StageKind.COMM

    def __init__(self, name: str, dispatcher):
        self.name, self.dispatcher = name, dispatcher

    def forward(self, state: StageState, inputs: Tensors) -> Handle:
        residual, output, shared, meta, ctx = inputs
        d = self.dispatcher
        meta.restore(d)
        send, recv = _split_list(d.output_splits), _split_list(d.input_splits)
        state.send, state.recv = send, recv
        wants = output.requires_grad

        def received(combined) -> Tensors:
            state.like = _like(combined)
            return residual, combined.requires_grad_(wants), shared, meta, ctx

        with torch.no_grad():
            return _all_to_all(d.ep_group, (output,), send, recv, received)

    def backward(self, state: StageState, grads: Tensors) -> Handle:
        grad_residual, grad_combined, grad_shared = grads[:3]
        grad_combined = _zeros_if_none(grad_combined, state.like)
        send, recv = state.send, state.recv
        state.clear()

        def received(output_grad) -> Tensors:
            return grad_residual, output_grad, grad_shared, None, None

        return _all_to_all(self.dispatcher.ep_group, (grad_combined,), recv, send, received)


# ------------------------------------------------------------------------------------------ layers


def _rng_context(config):
    """``TransformerBlock.forward`` runs its layers inside the RNG tracker's fork under sequence parallel."""
    if getattr(config, "sequence_parallel", False):
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


class MegatronLayerStages(nn.Module):
    """One Megatron ``TransformerLayer`` as a part of a :class:`~dualpipe_plugin.runtime.staged.StagedChunk`.

    MoE layers (``mlp`` a ``MoELayer`` with the alltoall dispatcher) give five sub-stages (module doc),
    dense layers one. Inputs ``(hidden_states[, ctx])`` with ``hidden_states`` [s, b, h] and ``ctx`` a
    :class:`LayerContext` (None: no mask, no rotary embedding); outputs ``(hidden_states'[, ctx])``.
    Calling the module itself runs the unsplit ``layer`` (what ``TransformerBlock`` would do).
    """

    def __init__(self, layer) -> None:
        super().__init__()
        check_layer(layer)
        self.layer = layer
        self.is_moe = _is_moe(layer)

    @property
    def label(self) -> str:
        return f"L{self.layer.layer_number}"

    def sub_stages(self):
        label = self.label
        if not self.is_moe:
            return (ComputeStage(f"{label}.layer", self._dense),)
        dispatcher = self.layer.mlp.token_dispatcher
        return (
            ComputeStage(f"{label}.attn", self._attn),
            _Dispatch(f"{label}.dispatch", dispatcher),
            ComputeStage(f"{label}.experts", self._experts),
            _Combine(f"{label}.combine", dispatcher),
            ComputeStage(f"{label}.post", self._post),
        )

    def forward(self, hidden_states: torch.Tensor, ctx: LayerContext | None = None):
        c = ctx or _NO_CONTEXT
        with _rng_context(self.layer.config):
            out, _ = self.layer(hidden_states=hidden_states, **_layer_kwargs(c))
        return out if ctx is None else (out, ctx)

    # -- compute sub-stages --------------------------------------------------------------------------
    def _dense(self, hidden_states, ctx=None):
        return self.forward(hidden_states, ctx)

    def _attn(self, hidden_states, ctx=None):
        layer = self.layer
        mlp = layer.mlp
        c = ctx or _NO_CONTEXT
        with _rng_context(layer.config):
            hidden, _ = layer._forward_attention(hidden_states=hidden_states, **_layer_kwargs(c))
            normed = layer._forward_pre_mlp_layernorm(hidden)
            # MoELayer.forward: the padding mask goes in as [s, b] bool.
            padding = None if c.padding_mask is None else c.padding_mask.transpose(0, 1).bool()
            shared = mlp.shared_experts_compute(normed)
            probs, routing_map = mlp.route(normed, padding)
            tokens, probs = mlp.preprocess(normed, probs, routing_map)
        return hidden, tokens, probs, shared, _DispatcherState(mlp.token_dispatcher), ctx

    def _experts(self, residual, tokens, probs, shared, meta, ctx):
        mlp = self.layer.mlp
        meta.restore(mlp.token_dispatcher)
        with _rng_context(self.layer.config):
            output, mlp_bias = mlp.routed_experts_compute(tokens, probs)
        assert mlp_bias is None, "MoELayer.routed_experts_compute returned a bias"
        return residual, output, shared, _DispatcherState(mlp.token_dispatcher), ctx

    def _post(self, residual, output, shared, meta, ctx):
        layer = self.layer
        meta.restore(layer.mlp.token_dispatcher)
        with _rng_context(layer.config):
            output = layer.mlp.postprocess(output, shared)
            hidden = layer._forward_post_mlp((output, None), residual)
        return hidden if ctx is None else (hidden, ctx)


def _layer_kwargs(c: LayerContext) -> dict[str, Any]:
    return dict(
        attention_mask=c.attention_mask, rotary_pos_emb=c.rotary_pos_emb, rotary_pos_cos=c.rotary_pos_cos,
        rotary_pos_sin=c.rotary_pos_sin, sequence_len_offset=c.sequence_len_offset, padding_mask=c.padding_mask,
    )


# ------------------------------------------------------------------------------------------- chunks


class _Holder:
    """Keeps a module reachable without registering it (its parameters stay out of this part's list)."""

    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module


@contextlib.contextmanager
def _input_tensor(block, tensor):
    saved = block.input_tensor
    block.input_tensor = tensor
    try:
        yield
    finally:
        block.input_tensor = saved


class _Prologue(nn.Module):
    """COMPUTE: ``GPTModel._preprocess`` (embedding on the first stage, rotary embeddings), as ``GPTModel.forward``.

    Inputs ``(input_ids, position_ids[, attention_mask[, labels]])`` with the embedding, else
    ``(hidden_states[, attention_mask[, labels]])``; outputs ``(hidden_states, ctx)``. ``to_half``: what a
    ``Float16Module`` wrapper does to the first stage's inputs.
    """

    def __init__(self, gpt, first: bool, to_half: Callable | None = None):
        super().__init__()
        self._gpt = _Holder(gpt)
        self.first = first
        self._to_half = to_half if first else None
        if first:
            self.embedding = gpt.embedding  # registered: its parameters belong to this chunk

    def forward(self, *inputs):
        gpt = self._gpt.module
        if self._to_half is not None:
            inputs = self._to_half(inputs)
        if self.first:
            input_ids, position_ids, attention_mask, labels = (*inputs, None, None)[:4]
            received = None
        else:
            received, attention_mask, labels = (*inputs, None, None)[:3]
            input_ids = position_ids = None
        # The rotary length reads decoder.input_tensor (set_input_tensor) on non-first stages.
        with _input_tensor(gpt.decoder, received):
            decoder_input, rope, cos, sin, offset, padding = gpt._preprocess(
                input_ids=input_ids, position_ids=position_ids, decoder_input=received
            )[:6]
        from megatron.core.utils import make_viewless_tensor

        hidden = make_viewless_tensor(inp=decoder_input, requires_grad=True, keep_graph=True)
        ctx = LayerContext(
            attention_mask=attention_mask, rotary_pos_emb=rope, rotary_pos_cos=cos, rotary_pos_sin=sin,
            sequence_len_offset=offset, padding_mask=padding, input_ids=input_ids, position_ids=position_ids,
            labels=labels, decoder_input=decoder_input,
        )
        return hidden, ctx


class _Epilogue(nn.Module):
    """COMPUTE: the decoder's final layernorm and ``GPTModel._postprocess`` (output layer, loss with labels)
    on the last stage; elsewhere it only drops the context. Output: one tensor."""

    def __init__(self, gpt, last: bool, first: bool, to_float: Callable | None = None):
        super().__init__()
        self._gpt = _Holder(gpt)
        self.last = last
        self._to_float = to_float if last else None
        if last:
            self.final_layernorm = gpt.decoder.final_layernorm
            self.output_layer = gpt.output_layer if gpt.post_process else None
            if gpt.post_process and gpt.share_embeddings_and_output_weights and not first and gpt.pre_process:
                # Tied head on a chunk without the embedding: list the shared weight with this chunk too.
                self.tied_embedding = gpt.embedding.word_embeddings

    def forward(self, hidden, ctx):
        gpt = self._gpt.module
        if not self.last:
            return hidden
        from megatron.core.utils import make_viewless_tensor

        if gpt.decoder.final_layernorm is not None:
            hidden = gpt.decoder.final_layernorm(hidden)
            hidden = make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True)
        output = gpt._postprocess(
            hidden_states=hidden, input_ids=ctx.input_ids, position_ids=ctx.position_ids, labels=ctx.labels,
            rotary_pos_emb=ctx.rotary_pos_emb, rotary_pos_cos=ctx.rotary_pos_cos, rotary_pos_sin=ctx.rotary_pos_sin,
            mtp_in_postprocess=False, loss_mask=None, decoder_input=ctx.decoder_input,
            attention_mask=ctx.attention_mask, packed_seq_params=None, sequence_len_offset=ctx.sequence_len_offset,
        )
        return output if self._to_float is None else self._to_float(output)


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers, and the wrapper's input / output casts if any."""
    from megatron.core.transformer.module import Float16Module, float16_to_fp32, fp32_to_float16

    to_half = to_float = None
    while hasattr(model, "module"):
        if isinstance(model, Float16Module):
            convertor = model.float16_convertor
            to_half = lambda inputs: fp32_to_float16(inputs, convertor)  # noqa: E731
            to_float = float16_to_fp32
        model = model.module
    return model, to_half, to_float


def megatron_staged_chunk(model, *, layers: slice | None = None) -> StagedChunk:
    """A :class:`StagedChunk` computing Megatron ``GPTModel`` ``model``, or a slice of its decoder layers.

    ``model`` may be wrapped in Megatron's ``DistributedDataParallel`` and / or ``Float16Module``; the
    latter's casts are applied where the chunk holds the embedding (inputs to half) and the output layer
    (outputs to fp32), i.e. at the model's ends, whatever Megatron's pipeline ranks say.

    Parts: the prologue (embedding if ``model.pre_process`` and the slice starts at layer 0; rotary
    embeddings), one :class:`MegatronLayerStages` per layer of ``layers`` (default: all), the epilogue
    (final layernorm and output layer if ``model.post_process`` and the slice reaches the last layer).

    Call convention (positional; ``StagedChunk`` takes tensors only)::

        with the embedding:  chunk(input_ids, position_ids[, attention_mask[, labels]])
        without:             chunk(hidden_states[, attention_mask[, labels]])      # [s, b, h]
        returns              logits [b, s, vocab] (labels None) or per-token loss [b, s] with the head,
                             else hidden_states [s, b, h]

    which equals ``model(input_ids, position_ids, attention_mask, labels=labels)`` (after
    ``model.set_input_tensor(hidden_states)`` without the embedding) bit for bit. Refused (ValueError):
    multi-token prediction, full recompute, and the layer settings of :func:`check_layer`.
    """
    gpt, to_half, to_float = _unwrap(model)
    from megatron.core.models.gpt import GPTModel

    if not isinstance(gpt, GPTModel):
        raise TypeError(f"megatron_staged_chunk expects a megatron.core GPTModel (or its DDP wrapper), "
                        f"got {type(gpt).__name__}")
    if gpt.config.mtp_num_layers:
        raise MegatronOverlapError("multi-token prediction (mtp_num_layers) has no sub-stage split here; "
                                   "unset mtp_num_layers or use Megatron's schedules")
    all_layers = list(gpt.decoder.layers)
    chosen = range(len(all_layers))[layers if layers is not None else slice(None)]
    if chosen.step != 1:
        raise ValueError(f"layers must be a contiguous slice, got {layers}")
    first = gpt.pre_process and (len(chosen) == 0 or chosen.start == 0)
    last = len(chosen) == 0 or chosen.stop == len(all_layers)
    parts: list[nn.Module] = [_Prologue(gpt, first, to_half)]
    parts += [MegatronLayerStages(all_layers[i]) for i in chosen]
    parts.append(_Epilogue(gpt, last and gpt.post_process, first, to_float))
    return StagedChunk(parts)
