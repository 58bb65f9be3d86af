"""Where a schedule's model chunks sit in a Megatron-Core model: layer numbers, pre/post-process, embeddings.

Megatron-Core numbers stages ``vp_stage * P + pp_rank`` and has no other placement. This module takes the
placement from the schedule's spec (:class:`dualpipe_plugin.schedules.ScheduleSpec`, the single source of
truth) and makes Megatron build the right layers:

==========  ===========================  ====================================  ======================
schedule    chunk c on pipeline rank r   layers per chunk (L layers in all)    pre / post-process
==========  ===========================  ====================================  ======================
dualpipev   stage r (c=0), 2P-1-r (c=1)  L / 2P, offset stage * L / 2P         rank 0: c=0 pre, c=1 post
                                         (or ``stage_layers[stage]``, offset the
                                         sum of the stages before)
dualpipe    stage r (c=0), P-1-r (c=1)   L / P,  offset stage * L / P          rank 0: c=0 pre, c=1 post;
                                                                               rank P-1: c=0 post, c=1 pre
zbv         as dualpipev                 as dualpipev                          as dualpipev
1f1b, zb1p  stage r                      Megatron's own (one chunk, vp unset)  Megatron's own
==========  ===========================  ====================================  ======================

(Any schedule whose spec holds two chunks per rank is placed the same way: the table is read off
``spec.placement(P)``, nothing here names a schedule.)

A two-chunk model is Megatron's "two virtual stages per rank":
:func:`~dualpipe_plugin.megatron.model_config.configure_model_config` sets
``config.virtual_pipeline_model_parallel_size = 2``, ``config.pipeline_schedule`` and
``config.pipeline_options``, chunk c is built with
``vp_stage=c`` (what Megatron-LM's ``model_provider(pre_process, post_process, vp_stage)`` receives), and
the hooks below answer Megatron's layer questions from our placement. Layer numbers are global and
1-based as in Megatron, so checkpoint keys (``decoder.layers.{global}``, sharded-state-dict offsets) do not
depend on the schedule: a checkpoint written under dualpipev loads under 1F1B and back.

Hooks (:func:`install_placement_hooks`; process-wide, idempotent, undone by :func:`remove_placement_hooks`,
applied through the adapter's :class:`~dualpipe_plugin.megatron.patching.PatchSet`; each one is inert for a
config whose options hold a one-chunk schedule or none):

1. ``transformer_layer.get_transformer_layer_offset`` and every module that imported it by name
   (``transformer_block``, ``gpt_layer_specs``, ... : all loaded ``megatron.*`` modules holding the original)
   -> the layers of the stages before (``stage * layers_per_stage`` when uniform). Used by ``TransformerLayer.__init__`` (``layer_number``),
   ``TransformerBlock`` (build and ``sharded_state_dict``), ``get_gpt_decoder_block_spec`` (which layers
   are MoE), attention. Installed for good, not only while building: ``sharded_state_dict`` asks again.
2. ``transformer_block.get_num_layers_to_build`` and its by-name imports -> the stage's layer count.
3. ``LanguageModule._is_in_embd_group`` -> False. Megatron's embedding group joins the first and last
   pipeline *ranks*; in a V both ends of the model are on rank 0, in DualPipe each end rank holds both.
   The init-time all-reduce that copies the embedding into the last stage's output layer would pair the
   wrong chunks (or hang), so it is skipped and :func:`synchronize_initial_copies` ties locally instead.

The embedding tie at run time is handled in :mod:`dualpipe_plugin.megatron.grads` (local sum; Megatron's
embedding-group all-reduce is skipped in ``finalize_model_grads``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dualpipe_plugin.megatron.errors import MegatronScheduleError
from dualpipe_plugin.megatron.patching import Patch, PatchSet, everywhere
from dualpipe_plugin.schedules import ScheduleConfigError, ScheduleSpec, get_schedule

__all__ = [
    "ChunkPlacement",
    "ModelPlacement",
    "build_model_chunks",
    "install_placement_hooks",
    "mark_copies_as_replicas",
    "mark_mirrored_replicas",
    "placement_of",
    "places_chunks",
    "remove_placement_hooks",
    "synchronize_initial_copies",
    "unwrap",
]


def places_chunks(spec: ScheduleSpec) -> bool:
    """True when this module builds the chunks of ``spec`` (two per rank); one-chunk schedules keep
    Megatron's own placement."""
    return spec.chunks_per_rank > 1


@dataclass(frozen=True, slots=True)
class ChunkPlacement:
    """One model chunk of one pipeline rank."""

    chunk: int
    stage: int
    """Which slice of the model (0 = embedding side) this chunk computes."""
    layer_offset: int | None
    """Global index of its first transformer layer (0-based; Megatron's ``layer_number`` = offset + 1 + i)."""
    num_layers: int | None
    pre_process: bool
    """Holds the embedding (first stage of its route)."""
    post_process: bool
    """Holds the final norm, output layer and loss (last stage of its route)."""


class ModelPlacement:
    """The chunks of every pipeline rank for ``schedule`` on ``pp_size`` ranks and ``num_layers`` layers,
    cut uniformly or into ``stage_layers`` (transformer layers per stage, stage 0 first: the counts
    ``dualpipe-plugin advise --profile`` prints for a profile of a Megatron model)."""

    def __init__(self, schedule: str | ScheduleSpec, pp_size: int, num_layers: int | None,
                 stage_layers: Sequence[int] | None = None):
        try:
            self.spec = get_schedule(schedule)
            self._placement = self.spec.placement(pp_size)
        except ScheduleConfigError as error:
            raise MegatronScheduleError(f"{error} (pipeline_model_parallel_size={pp_size})") from None
        self.schedule = self.spec.name
        self.pp_size = pp_size
        self.num_layers = num_layers
        self.num_stages = self._placement.num_stages
        self.num_chunks = self._placement.num_chunks
        if stage_layers is not None:
            self.stage_layers = _checked_stage_layers(stage_layers, self.schedule, self.num_stages, num_layers)
            self.layers_per_stage = None
            return
        if num_layers is not None and num_layers % self.num_stages:
            raise MegatronScheduleError(
                f"{self.schedule} cuts the model into {self.num_stages} stages on {pp_size} pipeline ranks, "
                f"but num_layers={num_layers} is not divisible by {self.num_stages}; use a multiple of "
                f"{self.num_stages} layers (e.g. {num_layers + (-num_layers) % self.num_stages}) or another "
                f"pipeline size"
            )
        # None: a model whose layers this module does not number (a config without num_layers).
        self.layers_per_stage = None if num_layers is None else num_layers // self.num_stages
        self.stage_layers = None if num_layers is None else (self.layers_per_stage,) * self.num_stages

    def chunk(self, pp_rank: int, chunk: int) -> ChunkPlacement:
        stage = self._placement.stage(pp_rank, chunk)
        return ChunkPlacement(
            chunk=chunk,
            stage=stage,
            layer_offset=None if self.stage_layers is None else sum(self.stage_layers[:stage]),
            num_layers=None if self.stage_layers is None else self.stage_layers[stage],
            pre_process=self._placement.is_first(pp_rank, chunk),
            post_process=self._placement.is_last(pp_rank, chunk),
        )

    def chunks(self, pp_rank: int) -> list[ChunkPlacement]:
        return [self.chunk(pp_rank, c) for c in range(self.num_chunks)]

    def mirror_peer(self, pp_rank: int) -> int | None:
        """DualPipe's other holder of this rank's stages (rank P-1-r), else None."""
        if not self._placement.mirrored:
            return None
        return self._placement.mirror_of(pp_rank, 0)[0]

    @property
    def mirrored(self) -> bool:
        return self._placement.mirrored


def _checked_stage_layers(stage_layers: Sequence[int], schedule: str, num_stages: int, num_layers: int | None) -> tuple:
    counts = tuple(stage_layers)
    if (len(counts) != num_stages or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts)
            or (num_layers is not None and sum(counts) != num_layers)):
        raise MegatronScheduleError(
            f"stage_layers={counts} does not place num_layers={num_layers} transformer layers on the {num_stages} "
            f"stages of {schedule}; give {num_stages} whole numbers >= 1 adding up to {num_layers}, stage 0 first "
            f"(dualpipe-plugin advise --profile prints them)"
        )
    return counts


@functools.lru_cache(maxsize=64)
def _cached_placement(spec: ScheduleSpec, pp_size: int, num_layers: int | None,
                      stage_layers: tuple[int, ...] | None) -> ModelPlacement:
    return ModelPlacement(spec, pp_size, num_layers, stage_layers)


def placement_of(config: Any) -> ModelPlacement | None:
    """The two-chunk placement a configured ``TransformerConfig`` asks for (``config.pipeline_options`` and
    ``config.pipeline_stage_layers``, set by ``configure_model_config``), else None: Megatron's own placement."""
    options = getattr(config, "pipeline_options", None)
    if options is None or not places_chunks(options.schedule):
        return None
    return _cached_placement(options.schedule, config.pipeline_model_parallel_size, getattr(config, "num_layers", None),
                             getattr(config, "pipeline_stage_layers", None))


# ------------------------------------------------------------------------------------------- hooks


_HOOKS = PatchSet()
"""The installed placement hooks: process-wide, as the Megatron modules they patch."""


def _pp_rank(pp_rank: int | None) -> int:
    if pp_rank is not None:
        return pp_rank
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


def _offset_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_transformer_layer_offset(config, vp_stage=None, pp_rank=None):
        placement = placement_of(config)
        if placement is None:
            return original(config, vp_stage, pp_rank)
        return placement.chunk(_pp_rank(pp_rank), vp_stage or 0).layer_offset

    get_transformer_layer_offset.__dualpipe_hook__ = original
    return get_transformer_layer_offset


def _num_layers_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_num_layers_to_build(config, vp_stage=None, pp_rank=None):
        placement = placement_of(config)
        if placement is None:
            return original(config, vp_stage, pp_rank)
        return placement.chunk(_pp_rank(pp_rank), vp_stage or 0).num_layers

    get_num_layers_to_build.__dualpipe_hook__ = original
    return get_num_layers_to_build


def _embedding_group_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def _is_in_embd_group(self):
        if placement_of(self.config) is not None:
            return False
        return original(self)

    _is_in_embd_group.__dualpipe_hook__ = original
    return _is_in_embd_group


def install_placement_hooks() -> None:
    """Install the hooks of the module docstring (once per process; a no-op when installed)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.transformer import transformer_block, transformer_layer

    with _HOOKS.lock:
        if _HOOKS:
            return
        _HOOKS.apply([
            *everywhere(transformer_layer, "get_transformer_layer_offset", _offset_hook,
                        "global layer numbers of the schedule's placement"),
            *everywhere(transformer_block, "get_num_layers_to_build", _num_layers_hook,
                        "layers per stage of the schedule's placement"),
            Patch(LanguageModule, "_is_in_embd_group",
                  _embedding_group_hook(LanguageModule.__dict__["_is_in_embd_group"]),
                  "both ends of the model share a rank: tie locally, not through the embedding group"),
        ])


def remove_placement_hooks() -> None:
    """Restore every patched binding (tests; models built meanwhile keep their layer numbers)."""
    _HOOKS.undo()


# ------------------------------------------------------------------------------------------ models


def unwrap(chunk: Any) -> Any:
    """The innermost module of a (DDP / Float16Module-)wrapped chunk: the one with ``pre_process``, or, for
    a model without it (Megatron's schedules ask only for ``set_input_tensor``), the innermost ``.module``."""
    while not hasattr(chunk, "pre_process") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def build_model_chunks(model_provider: Callable[..., Any], config: Any, *, pp_rank: int | None = None) -> list:
    """This rank's chunks for the schedule ``config`` was configured for, from Megatron-LM's provider.

    ``model_provider(pre_process=, post_process=, vp_stage=)`` builds one chunk (``vp_stage`` is the chunk
    index for dualpipe/dualpipev, None otherwise). Afterwards the copies that must start equal are made
    equal (:func:`synchronize_initial_copies`). Wrap the chunks in DDP afterwards, as Megatron-LM does.
    """
    from megatron.core import parallel_state

    name = getattr(config, "pipeline_schedule", None)
    if name is None:
        raise MegatronScheduleError(
            "config has no pipeline_schedule; call dualpipe_plugin.megatron.configure_model_config(config, "
            "schedule) before building the model"
        )
    rank = _pp_rank(pp_rank)
    placement = placement_of(config)
    if placement is None:  # one chunk, Megatron's own placement
        size = config.pipeline_model_parallel_size
        return [model_provider(pre_process=rank == 0, post_process=rank == size - 1, vp_stage=None)]
    chunks = [
        model_provider(pre_process=c.pre_process, post_process=c.post_process, vp_stage=c.chunk)
        for c in placement.chunks(rank)
    ]
    synchronize_initial_copies(chunks, pp_group=parallel_state.get_pipeline_model_parallel_group())
    mark_copies_as_replicas(chunks)
    return chunks


def mark_mirrored_replicas(sharded_state_dict: dict) -> dict:
    """Mark every tensor of a sharded state dict as a replica (in place; returned)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedBase):
            replica = value.replica_id if isinstance(value.replica_id, tuple) else (value.replica_id,)
            value.replica_id = (replica[0] + 1,) + tuple(replica[1:])
    return sharded_state_dict


def mark_copies_as_replicas(chunks: Sequence[Any]) -> None:
    """DualPipe: chunk 1 of every rank repeats a stage its mirror rank holds as chunk 0. Its
    ``sharded_state_dict()`` then answers with every tensor marked as a replica, so distributed
    checkpointing (ours, and Megatron-LM's own ``save_checkpoint``/``load_checkpoint``) writes each stage
    once and loads it into both copies. A no-op for other placements; idempotent."""
    module = unwrap(chunks[0])
    placement = placement_of(module.config)
    if placement is None or not placement.mirrored or len(chunks) < 2:
        return
    copy = unwrap(chunks[1])
    if copy.__dict__.get("_dualpipe_replica_copy"):
        return
    original = copy.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        return mark_mirrored_replicas(original(*args, **kwargs))

    copy.__dict__["sharded_state_dict"] = sharded_state_dict
    copy.__dict__["_dualpipe_replica_copy"] = True


def tied_embedding_pairs(chunks: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(word embedding, output-layer copy) parameter pairs held by different chunks of this rank."""
    modules = [unwrap(chunk) for chunk in chunks]
    embeddings = [
        m.embedding.word_embeddings.weight for m in modules
        if getattr(m, "share_embeddings_and_output_weights", False) and m.pre_process and not m.post_process
    ]
    outputs = [
        m.output_layer.weight for m in modules
        if getattr(m, "share_embeddings_and_output_weights", False) and m.post_process and not m.pre_process
    ]
    return [(embedding, output) for embedding in embeddings for output in outputs]


def synchronize_initial_copies(chunks: Sequence[Any], *, pp_group: Any) -> None:
    """Make the copies a two-chunk placement keeps start equal (call once, after building all chunks).

    DualPipe: rank r's chunk 0 (stage r) is authoritative; rank P-1-r receives it into its chunk 1 (the
    same stage), all parameters, positionally. Then on every rank holding both ends of the model (V:
    rank 0; DualPipe: ranks 0 and P-1) the output layer's copy of a tied word embedding takes the
    embedding's values (Megatron zero-fills it and would have filled it through the embedding group).

    Copies are marked ``param.shared = True`` (the output layer's copy of the embedding; all of DualPipe's
    chunk 1), Megatron's mark for "a duplicate": its optimizers leave such parameters out of the gradient
    norm (clipping) and the zero count, so every parameter of the model is counted once.

    The exchange goes through the runtime's transport on ``pp_group`` and waits at most the pipeline's
    ``timeout_s``: a peer that died or is stuck while building its model raises
    :class:`~dualpipe_plugin.runtime.errors.PipelinePeerError` / ``PipelineTimeoutError`` naming it.
    """
    import torch
    import torch.distributed as dist

    from dualpipe_plugin.runtime.transport import P2P, Channel, TorchTransport

    config = unwrap(chunks[0]).config
    placement = placement_of(config)
    if placement is None:
        return
    if placement.mirrored and dist.is_initialized():
        mine = list(unwrap(chunks[0]).parameters())  # stage r: authoritative, goes to the peer's chunk 1
        theirs = list(unwrap(chunks[1]).parameters())  # stage P-1-r: comes from the peer's chunk 0
        device = mine[0].device
        transport = TorchTransport(dist.get_process_group_ranks(pp_group),
                                   groups={channel: pp_group for channel in Channel}, device=device)
        peer = placement.mirror_peer(transport.rank)
        timeout_s = config.pipeline_options.timeout_s
        with torch.no_grad():
            # Both ranks of a pair see the same set of dtypes (their two chunks are the same two stages).
            for dtype in sorted({p.dtype for p in mine + theirs}, key=str):
                parts = [p.detach().reshape(-1) for p in mine if p.dtype == dtype]
                send = torch.cat(parts + [torch.empty(0, dtype=dtype, device=device)])
                recv = torch.empty(sum(p.numel() for p in theirs if p.dtype == dtype), dtype=dtype, device=device)
                what = f"the initial {str(dtype).removeprefix('torch.')} parameters of the mirrored stages"
                sending, receiving = transport.start([P2P(True, send, peer, Channel.ACTIVATION, what),
                                                      P2P(False, recv, peer, Channel.ACTIVATION, what)])
                receiving.wait(timeout_s)  # first: a stuck peer is then reported as the one not sending
                sending.wait(timeout_s)
                offset = 0
                for p in theirs:
                    if p.dtype == dtype:
                        p.data.copy_(recv[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
    with torch.no_grad():
        for embedding, output in tied_embedding_pairs(chunks):
            output.data.copy_(embedding.data)
            output.shared = True
    if placement.mirrored:
        for param in unwrap(chunks[1]).parameters():
            param.shared = True
