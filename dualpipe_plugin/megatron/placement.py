"""Where a schedule's model chunks sit in a Megatron-Core model: layer numbers, pre/post-process, embeddings.

Megatron-Core numbers stages ``vp_stage * P + pp_rank`` and has no other placement. This module takes the
placement from the schedule layer (:func:`dualpipe_plugin.schedules.build_schedule`, the single source of
truth) and makes Megatron build the right layers:

==========  ===========================  ====================================  ======================
schedule    chunk c on pipeline rank r   layers per chunk (L layers in all)    pre / post-process
==========  ===========================  ====================================  ======================
dualpipev   stage r (c=0), 2P-1-r (c=1)  L / 2P, offset stage * L / 2P         rank 0: c=0 pre, c=1 post
dualpipe    stage r (c=0), P-1-r (c=1)   L / P,  offset stage * L / P          rank 0: c=0 pre, c=1 post;
                                                                               rank P-1: c=0 post, c=1 pre
1f1b, zb1p  stage r                      Megatron's own (one chunk, vp unset)  Megatron's own
==========  ===========================  ====================================  ======================

A two-chunk model is Megatron's "two virtual stages per rank": :func:`configure_model_config` sets
``config.virtual_pipeline_model_parallel_size = 2`` and ``config.pipeline_schedule``, chunk c is built with
``vp_stage=c`` (what Megatron-LM's ``model_provider(pre_process, post_process, vp_stage)`` receives), and
the hooks below answer Megatron's layer questions from our placement. Layer numbers are global and
1-based as in Megatron, so checkpoint keys (``decoder.layers.{global}``, sharded-state-dict offsets) do not
depend on the schedule: a checkpoint written under dualpipev loads under 1F1B and back.

Hooks (:func:`install_placement_hooks`; process-wide, idempotent, undone by :func:`remove_placement_hooks`;
each one is inert for a config whose ``pipeline_schedule`` is not dualpipe/dualpipev):

1. ``transformer_layer.get_transformer_layer_offset`` and every module that imported it by name
   (``transformer_block``, ``gpt_layer_specs``, ... : all loaded ``megatron.*`` modules holding the original)
   -> ``stage * layers_per_stage``. Used by ``TransformerLayer.__init__`` (``layer_number``),
   ``TransformerBlock`` (build and ``sharded_state_dict``), ``get_gpt_decoder_block_spec`` (which layers
   are MoE), attention. Installed for good, not only while building: ``sharded_state_dict`` asks again.
2. ``transformer_block.get_num_layers_to_build`` and its by-name imports -> ``layers_per_stage``.
3. ``LanguageModule._is_in_embd_group`` -> False. Megatron's embedding group joins the first and last
   pipeline *ranks*; in a V both ends of the model are on rank 0, in DualPipe each end rank holds both.
   The init-time all-reduce that copies the embedding into the last stage's output layer would pair the
   wrong chunks (or hang), so it is skipped and :func:`synchronize_initial_copies` ties locally instead.

The embedding tie at run time is handled in :mod:`dualpipe_plugin.megatron.grads` (local sum; Megatron's
embedding-group all-reduce is skipped in ``finalize_model_grads``).
"""

from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from dualpipe_plugin.megatron.errors import MegatronScheduleError
from dualpipe_plugin.schedules import ScheduleConfigError, build_schedule

__all__ = [
    "TWO_CHUNK_SCHEDULES",
    "ChunkPlacement",
    "ModelPlacement",
    "build_model_chunks",
    "check_model_config",
    "configure_model_config",
    "install_placement_hooks",
    "placement_of",
    "remove_placement_hooks",
    "synchronize_initial_copies",
    "unwrap",
]

TWO_CHUNK_SCHEDULES = ("dualpipe", "dualpipev")
"""Schedules whose ranks hold two chunks built by this module (the others use Megatron's placement)."""


@dataclass(frozen=True, slots=True)
class ChunkPlacement:
    """One model chunk of one pipeline rank."""

    chunk: int
    stage: int
    """Which slice of the model (0 = embedding side) this chunk computes."""
    layer_offset: int
    """Global index of its first transformer layer (0-based; Megatron's ``layer_number`` = offset + 1 + i)."""
    num_layers: int
    pre_process: bool
    """Holds the embedding (first stage of its route)."""
    post_process: bool
    """Holds the final norm, output layer and loss (last stage of its route)."""


class ModelPlacement:
    """The chunks of every pipeline rank for ``schedule`` on ``pp_size`` ranks and ``num_layers`` layers."""

    def __init__(self, schedule: str, pp_size: int, num_layers: int):
        self.schedule = schedule.lower()
        self.pp_size = pp_size
        self.num_layers = num_layers
        try:
            # Any valid micro-batch count: the placement does not depend on it.
            self._placement = build_schedule(self.schedule, pp_size, 2 * pp_size).placement
        except ScheduleConfigError as error:
            raise MegatronScheduleError(f"{error} (pipeline_model_parallel_size={pp_size})") from None
        self.num_stages = self._placement.num_stages
        self.num_chunks = self._placement.num_chunks
        if num_layers % self.num_stages:
            raise MegatronScheduleError(
                f"{self.schedule} cuts the model into {self.num_stages} stages on {pp_size} pipeline ranks, "
                f"but num_layers={num_layers} is not divisible by {self.num_stages}; use a multiple of "
                f"{self.num_stages} layers (e.g. {num_layers + (-num_layers) % self.num_stages}) or another "
                f"pipeline size"
            )
        self.layers_per_stage = num_layers // self.num_stages

    def chunk(self, pp_rank: int, chunk: int) -> ChunkPlacement:
        stage = self._placement.stage(pp_rank, chunk)
        return ChunkPlacement(
            chunk=chunk,
            stage=stage,
            layer_offset=stage * self.layers_per_stage,
            num_layers=self.layers_per_stage,
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


@functools.lru_cache(maxsize=64)
def _cached_placement(schedule: str, pp_size: int, num_layers: int) -> ModelPlacement:
    return ModelPlacement(schedule, pp_size, num_layers)


def placement_of(config: Any) -> ModelPlacement | None:
    """The two-chunk placement a configured ``TransformerConfig`` asks for, else None (Megatron's own)."""
    name = getattr(config, "pipeline_schedule", None)
    if not isinstance(name, str) or name.lower() not in TWO_CHUNK_SCHEDULES:
        return None
    return _cached_placement(name.lower(), config.pipeline_model_parallel_size, config.num_layers)


# ------------------------------------------------------------------------------------ config checks

_UNSUPPORTED_TWO_CHUNK = (
    ("pipeline_model_parallel_layout", "a custom pipeline layout", "the schedule places layers itself"),
    ("num_layers_in_first_pipeline_stage", "uneven first-stage layer counts", "stages are uniform"),
    ("num_layers_in_last_pipeline_stage", "uneven last-stage layer counts", "stages are uniform"),
    ("account_for_embedding_in_pipeline_split", "account_for_embedding_in_pipeline_split", "stages are uniform"),
    ("account_for_loss_in_pipeline_split", "account_for_loss_in_pipeline_split", "stages are uniform"),
    ("mtp_num_layers", "multi-token prediction", "its layers would need the last stage on the last rank"),
    ("heterogeneous_block_specs", "heterogeneous block specs", "per-layer configs are not placed"),
)

_UNSUPPORTED_ANY = (
    ("defer_embedding_wgrad_compute", "defer_embedding_wgrad_compute",
     "the runtime's B/W split already defers weight gradients; turn it off"),
    ("overlap_moe_expert_parallel_comm", "overlap_moe_expert_parallel_comm",
     "that is Megatron's combined-1F1B overlap for its own schedules; turn it off"),
    ("delay_wgrad_compute", "delay_wgrad_compute",
     "that is Transformer Engine's B/W split for Megatron's schedules; this plugin splits W itself, turn it off"),
    ("num_microbatches_with_partial_activation_checkpoints", "partial activation checkpointing per micro-batch",
     "use full or selective recomputation"),
)


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0)


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def check_model_config(config: Any, schedule: str) -> None:
    """Refuse settings ``schedule`` cannot run with, before any model is built or step taken."""
    name = schedule.lower()
    for attr, what, why in _UNSUPPORTED_ANY:
        if _is_set(getattr(config, attr, None)):
            raise MegatronScheduleError(f"pipeline schedule {name!r} does not support {what} ({attr}): {why}")
    if getattr(config, "fp8", None) and not _te_available():
        raise MegatronScheduleError(
            f"fp8={config.fp8!r} needs Transformer Engine, which is not installed; install transformer_engine "
            f"or drop fp8"
        )
    if name in TWO_CHUNK_SCHEDULES:
        vp = config.virtual_pipeline_model_parallel_size
        if vp is not None and getattr(config, "pipeline_schedule", None) != name:
            raise MegatronScheduleError(
                f"{name} places two chunks per rank itself; do not also set the virtual pipeline size "
                f"(virtual_pipeline_model_parallel_size={config.virtual_pipeline_model_parallel_size}, "
                f"--virtual-pipeline-model-parallel-size / --num-layers-per-virtual-pipeline-stage): remove it"
            )
        for attr, what, why in _UNSUPPORTED_TWO_CHUNK:
            if _is_set(getattr(config, attr, None)):
                raise MegatronScheduleError(f"{name} does not support {what} ({attr}): {why}")
        ModelPlacement(name, config.pipeline_model_parallel_size, config.num_layers)  # divisibility, P even
    elif config.virtual_pipeline_model_parallel_size is not None:
        raise MegatronScheduleError(
            f"{name} runs one chunk per rank; unset virtual_pipeline_model_parallel_size "
            f"(={config.virtual_pipeline_model_parallel_size}) or use the 'megatron' schedule for interleaving"
        )
    else:
        build_schedule(name, config.pipeline_model_parallel_size, 1)  # the name and P


def configure_model_config(config: Any, schedule: str) -> Any:
    """Mark ``config`` (a ``TransformerConfig``) for ``schedule``, before the model is built. Returns it.

    Sets ``config.pipeline_schedule`` and, for dualpipe/dualpipev, ``virtual_pipeline_model_parallel_size
    = 2`` (two chunks per rank, built with ``vp_stage`` 0 and 1); installs the placement hooks. Calling it
    again with the same schedule is a no-op. ``schedule="megatron"`` (or a name registered with
    :func:`~dualpipe_plugin.megatron.register_schedule`) only sets ``config.pipeline_schedule``.
    """
    from dualpipe_plugin.megatron.registry import MEGATRON

    from dualpipe_plugin.megatron.registry import default_registry
    from dualpipe_plugin.schedules import schedule_names

    name = schedule.lower()
    if name not in schedule_names():  # Megatron's own, or a registered function with its own placement
        if name != MEGATRON:
            default_registry().lookup(name)  # UnknownScheduleError listing the valid names
        config.pipeline_schedule = name
        return config
    if getattr(config, "pipeline_schedule", None) == name:
        return config
    check_model_config(config, name)
    if name in TWO_CHUNK_SCHEDULES:
        install_placement_hooks()
        config.virtual_pipeline_model_parallel_size = 2
    config.pipeline_schedule = name
    return config


# ------------------------------------------------------------------------------------------- hooks


class _Hooks:
    """The one process-wide record of installed placement hooks (the patched modules are process-wide)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.applied: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)


_HOOKS = _Hooks()


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
        return placement.layers_per_stage

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
        if _HOOKS.applied:
            return
        targets = [
            (transformer_layer, "get_transformer_layer_offset", _offset_hook),
            (transformer_block, "get_num_layers_to_build", _num_layers_hook),
        ]
        try:
            for home, attr, make in targets:
                original = getattr(home, attr)
                hook = make(original)
                holders = [home] + [
                    module for name, module in list(sys.modules.items())
                    if name.startswith("megatron.") and module is not None and module is not home
                    and getattr(module, attr, None) is original
                ]
                for owner in holders:
                    _HOOKS.applied.append((owner, attr, original))
                    setattr(owner, attr, hook)
            original = LanguageModule.__dict__["_is_in_embd_group"]
            _HOOKS.applied.append((LanguageModule, "_is_in_embd_group", original))
            LanguageModule._is_in_embd_group = _embedding_group_hook(original)
        except BaseException:
            _undo()
            raise


def _undo() -> None:
    for owner, attr, original in reversed(_HOOKS.applied):
        setattr(owner, attr, original)
    _HOOKS.applied.clear()


def remove_placement_hooks() -> None:
    """Restore every patched binding (tests; models built meanwhile keep their layer numbers)."""
    with _HOOKS.lock:
        _undo()


# ------------------------------------------------------------------------------------------ models


def unwrap(chunk: Any) -> Any:
    """The innermost module of a (DDP / Float16Module-)wrapped chunk: the one with ``pre_process``."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)


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
    return chunks


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
    """
    import torch
    import torch.distributed as dist

    config = unwrap(chunks[0]).config
    placement = placement_of(config)
    if placement is None:
        return
    if placement.mirrored and dist.is_initialized():
        ranks = dist.get_process_group_ranks(pp_group)
        me = ranks.index(dist.get_rank())
        peer = ranks[placement.mirror_peer(me)]
        mine = list(unwrap(chunks[0]).parameters())  # stage r: authoritative, goes to the peer's chunk 1
        theirs = list(unwrap(chunks[1]).parameters())  # stage P-1-r: comes from the peer's chunk 0
        device = mine[0].device
        with torch.no_grad():
            # Both ranks of a pair see the same set of dtypes (their two chunks are the same two stages).
            for dtype in sorted({p.dtype for p in mine + theirs}, key=str):
                parts = [p.detach().reshape(-1) for p in mine if p.dtype == dtype]
                send = torch.cat(parts + [torch.empty(0, dtype=dtype, device=device)])
                recv = torch.empty(sum(p.numel() for p in theirs if p.dtype == dtype), dtype=dtype, device=device)
                works = [dist.isend(send, peer, group=pp_group), dist.irecv(recv, peer, group=pp_group)]
                for work in works:
                    work.wait()
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
