"""Megatron-Core 0.16 on CPU and gloo: an explicit, undoable opt-in for CI and laptops.

>>> from dualpipe_plugin.megatron import enable_cpu_mode
>>> with enable_cpu_mode():          # raises if CUDA is available, unless force=True
...     ...                          # parallel_state, GPTModel, DDP, get_forward_backward_func(), optimizer

Nothing here runs at import (Megatron is imported inside :func:`enable_cpu_mode` only). The mode is
never active unless called; it is reference-counted (every call returns its own :class:`CpuMode` handle,
the patches go in once and come out when the last handle is released), and releasing restores every
patched attribute to the object it held before. State *created* while the mode is on stays CPU state
(models, grad buffers, the RNG tracker's saved states, ``parallel_state``'s global memory buffer).

Scope: the code paths below were run on gloo with 1–4 processes (``tests/megatron/test_cpu_mode.py``,
and the plugin's own schedules, bf16 with the distributed optimizer and checkpointing in
``tests/megatron/test_schedule_fn.py`` / ``test_pretrain_gpt.py``;
PP=2 × EP=2 and ``overlap_grad_reduce`` by hand with the same harness):
a GPTModel from ``get_gpt_layer_local_spec`` (no Transformer Engine, no apex), fp32, TP=1;
``get_forward_backward_func()`` at PP=1, PP=2 and PP=4 (1F1B) and PP=2 × VP=2 (interleaved);
``megatron.core.distributed.DistributedDataParallel`` with and without ``overlap_grad_reduce`` and the
distributed optimizer; ``finalize_model_grads``; ``get_megatron_optimizer`` (Adam, grad clipping);
MoE layers with the alltoall token dispatcher (SequentialMLP experts, aux loss) at EP=2, alone and with
PP=2; the bf16 optimizer (Float16Module + distributed optimizer) and distributed checkpointing at PP=2.
Other paths (TP>1 with sequence parallel, fp16 loss scaling, grouped GEMM, the flex dispatcher, CUDA
graphs, ``overlap_moe_expert_parallel_comm``) may need more shims.

Patches (each at the narrowest binding that calls CUDA; "proxy" means the module's global ``torch`` is
replaced by a stand-in that forwards everything to torch except: factories with a CUDA ``device=``
(``empty zeros ones full tensor arange rand randn randint``) build on CPU, and ``torch.cuda`` answers
``current_device() -> cpu``, ``synchronize()`` no-op, ``is_available() -> False``, CPU ``Stream``/``Event``
stand-ins that are always complete, ``stream()``/``current_stream()``/``default_stream()``, no-op ``nvtx``, and
``get_rng_state``/``set_rng_state``/``manual_seed`` on the CPU default generator):

RNG
  1. ``tensor_parallel.random``: proxy, plus ``_get_cuda_rng_state``/``_set_cuda_rng_state`` read/write
     the CPU generator. ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add/fork`` get and
     set the CUDA generator; on CPU the default CPU generator is the one random ops on CPU tensors use,
     so the tracker forks it (the CPU analogue of what it does to the CUDA generator).
Model
  2. ``LanguageModule.setup_embeddings_and_output_layer``: runs with ``Tensor.cuda()`` as identity
     (during the call only). With tied embeddings and PP>1 it does ``weight.data = weight.data.cuda()``
     before the embedding-group all-reduce that gives the last stage's output-layer copy its values.
  3. ``fusions.fused_softmax.get_default_causal_mask`` (the name bound there): a CPU mask. The local
     DotProductAttention's torch softmax path builds the causal mask with ``device="cuda"``.
  4. ``megatron.core.utils``: proxy. ``GlobalMemoryBuffer.get_tensor`` (DotProductAttention's
     ``baddbmm`` buffer) allocates on ``torch.cuda.current_device()``.
DDP, schedules, p2p
  5. ``distributed.param_and_grad_buffer``: proxy. ``_ParamAndGradBuffer`` allocates the param/grad
     buffers on ``torch.cuda.current_device()``.
  6. ``pipeline_parallel.schedules``: proxy. All three schedules make ``total_num_tokens`` with
     ``torch.zeros(..., device="cuda")``.
  7. ``pipeline_parallel.p2p_communication``: proxy. Receive buffers and shape tensors are made on
     ``torch.cuda.current_device()``; ``torch.cuda.synchronize()`` after batched p2p.
  8. ``pipeline_parallel.p2p_communication._p2p_ops``: sends a copy of each outgoing tensor. With
     ``overlap_p2p_comm`` the schedule returns before the isend completes and
     ``deallocate_output_tensor`` (``deallocate_pipeline_outputs=True``, Megatron-LM's default) then
     swaps the output's ``.data`` for a 1-element tensor. On CUDA the stream-ordered caching allocator
     keeps the bytes valid; gloo reads the live buffer from its own thread, so the receiver got
     garbage (measured: wrong losses at PP=2 × VP=2). The copy is owned by gloo's send work.
MoE (alltoall dispatcher)
  9. ``tensor_parallel.mappings``: proxy. ``_gather_along_first_dim`` & co. (used by the dispatcher's
     ``gather_from_sequence_parallel_region`` over the EP group) allocate on ``current_device()``.
 10. ``transformer.moe.token_dispatcher``: proxy (``torch.cuda.Stream()`` for the D2H stream,
     ``current_stream()``, ``stream()``); ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` (a class
     attribute Megatron fills lazily) preset to a CPU stream so that no CPU stand-in survives undo;
     ``maybe_move_tensor_to_cpu`` (the name bound there) turns split-size tensors into numpy arrays. The
     original converts only CUDA tensors, so on CPU ``input_splits``/``output_splits`` stay tensors and
     ``all_to_all_single`` rejects them as split sizes.
 11. ``transformer.moe.router``: proxy. ``TopKRouter.gating`` moves a CPU-initialised weight to
     ``torch.cuda.current_device()``.
 12. ``transformer.moe.moe_utils.te_general_gemm = None`` (not a CUDA shim): without Transformer
     Engine 0.16.1 never defines the name, and ``RouterGatingLinearFunction`` raises ``NameError``.
Optimizer
 13. ``optimizer.optimizer``: proxy. ``FP32Optimizer`` and ``MixedPrecisionOptimizer`` make
     ``_scale``/``found_inf``/dummy buffers with ``device="cuda"``.
 14. ``optimizer.optimizer.clip_grad_by_total_norm_fp32`` (the name bound there; runs whenever
     ``clip_grad > 0``, Megatron's default) and
 15. ``DistributedOptimizer._build_model_and_main_param_groups``: run with ``Tensor.type()`` of a CPU
     tensor answering ``torch.cuda.FloatTensor`` etc. (during the call only); both compare type names
     against ``'torch.cuda.FloatTensor'`` and assert/raise otherwise.
 16. ``optimizer.clip_grads``: proxy. The norm and overflow buffers use ``device="cuda"``.
Distributed checkpointing (``dist_checkpointing.save``/``load`` with the default torch_dist strategy;
added for ``launch/pretrain_gpt.py --save/--load``, run in ``tests/megatron/test_pretrain_gpt.py``)
 17. ``dist_checkpointing.strategies.filesystem_async``: proxy. ``preload_tensors`` calls
     ``torch.cuda.synchronize()`` before writing.
 18. ``dist_checkpointing.strategies.async_utils``: proxy. ``synchronize()`` and status flags made on
     ``torch.cuda.current_device()`` in the (synchronous) save request.
 19. ``dist_checkpointing.strategies.state_dict_saver``: proxy. The save-plan verification and failure
     flags are ``torch.tensor(..., device="cuda")``.

Not patched because not reached with Megatron's defaults: nvtx (``megatron.core.utils`` ranges are off
unless ``configure_nvtx_profiling(True)``; the proxy of (4) covers them if turned on). Streams in DDP
(only with ``num_distributed_optimizer_instances > 1``). ``torch.autocast("cuda")`` in ``forward_step``
(only with ``enable_autocast``).

Pipeline settings on gloo (the config is the user's; CPU mode does not change it):
  * ``batch_p2p_comm=False``. With ``batch_p2p_comm=True`` and PP=2 the interleaved schedule's
    ``send_forward_backward_recv_forward_backward`` posts two sends to the single peer (prev == next);
    both ranks enqueue ``[send_prev, recv_prev, send_next, recv_next]`` with opposite roles, FIFO matching
    swaps activations and gradients of equal shape and nothing errors (measured on gloo: wrong losses and
    gradients; a known Megatron issue on any backend). The non-batched ``_p2p_ops`` keeps the directions
    apart (at group size 2 it routes one direction through the WORLD group). The non-interleaved
    schedule never sends both ways in one call, so either setting works there.
  * ``overlap_p2p_comm`` (interleaved only) works, with or without ``deallocate_pipeline_outputs``,
    given patch (8).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable

from dualpipe_plugin.megatron.patching import Patch, PatchSet

__all__ = ["CpuMode", "Patch", "enable_cpu_mode", "is_cpu_mode_active", "cpu_mode_patches"]

# ------------------------------------------------------------------------------ stand-ins for CUDA


def _is_cuda_device(device: Any) -> bool:
    import torch

    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index is a CUDA ordinal in torch's factories
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _factory_on_cpu(factory: Callable) -> Callable:
    """``factory`` with a CUDA ``device=`` argument replaced by the CPU."""

    @functools.wraps(factory)
    def on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return on_cpu


class _CpuEvent:
    """A CUDA event on a device where every op is synchronous: always complete."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        pass

    def record(self, stream=None) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream on a device where every op is synchronous: ordering is program order."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _NoNvtx:
    @staticmethod
    def range_push(msg) -> None:
        return None

    @staticmethod
    def range_pop() -> None:
        return None


class _CudaOnCpu:
    """What ``torch.cuda`` answers inside a proxied Megatron module: the device is the CPU."""

    Stream = _CpuStream
    Event = _CpuEvent
    nvtx = _NoNvtx

    def __init__(self, torch_module):
        self._torch = torch_module
        self._default_stream = _CpuStream()

    def current_device(self):
        return self._torch.device("cpu")

    def is_available(self) -> bool:
        return False

    def synchronize(self, device=None) -> None:
        return None

    def stream(self, stream):
        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return self._default_stream

    default_stream = current_stream

    def get_rng_state(self, device="cuda"):
        return self._torch.get_rng_state()

    def set_rng_state(self, new_state, device="cuda") -> None:
        self._torch.set_rng_state(new_state)

    def manual_seed(self, seed: int) -> None:
        self._torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def __getattr__(self, name):
        return getattr(self._torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Bound to one Megatron module's global ``torch``; forwards everything but CUDA placement."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint")

    def __init__(self, torch_module):
        super().__init__("torch", "torch as seen by a Megatron module in dualpipe_plugin's CPU mode")
        object.__setattr__(self, "_torch", torch_module)
        object.__setattr__(self, "cuda", _CudaOnCpu(torch_module))
        for name in self._FACTORIES:
            object.__setattr__(self, name, _factory_on_cpu(getattr(torch_module, name)))

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_torch"), name)


def _with_tensor_cuda_as_identity(function: Callable) -> Callable:
    """``function`` run with ``Tensor.cuda()`` returning the tensor itself, during the call only."""
    import torch

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return wrapper


def _with_cuda_type_names(function: Callable) -> Callable:
    """``function`` run with ``Tensor.type()`` of a CPU tensor naming the CUDA type, during the call only."""
    import torch

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def cuda_type_name(self, dtype=None, non_blocking=False, **kw):
            name = original(self, dtype, non_blocking, **kw)
            if dtype is None and isinstance(name, str) and self.device.type == "cpu":
                return name.replace("torch.", "torch.cuda.", 1)
            return name

        torch.Tensor.type = cuda_type_name
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapper


def _sending_copies(p2p_ops: Callable) -> Callable:
    """``_p2p_ops`` that hands gloo a private copy of each tensor it sends."""

    @functools.wraps(p2p_ops)
    def wrapper(*, tensor_send_prev, tensor_send_next, **kwargs):
        if tensor_send_prev is not None:
            tensor_send_prev = tensor_send_prev.detach().clone()
        if tensor_send_next is not None:
            tensor_send_next = tensor_send_next.detach().clone()
        return p2p_ops(tensor_send_prev=tensor_send_prev, tensor_send_next=tensor_send_next, **kwargs)

    return wrapper


def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for a CPU device: numpy when asked, else as is."""
    import torch

    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _causal_mask_on_cpu(sq: int):
    import torch

    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


# ------------------------------------------------------------------------------------ patch table


_PROXIED_MODULES = (
    ("megatron.core.tensor_parallel.random", "RNG tracker: torch.cuda.get_rng_state/manual_seed"),
    ("megatron.core.utils", "GlobalMemoryBuffer.get_tensor on torch.cuda.current_device()"),
    ("megatron.core.distributed.param_and_grad_buffer", "param/grad buffers on current_device()"),
    ("megatron.core.pipeline_parallel.schedules", "total_num_tokens = zeros(device='cuda')"),
    ("megatron.core.pipeline_parallel.p2p_communication", "recv buffers on current_device(); synchronize()"),
    ("megatron.core.tensor_parallel.mappings", "gather outputs on current_device() (MoE dispatcher)"),
    ("megatron.core.transformer.moe.token_dispatcher", "D2H Stream(), current_stream(), stream()"),
    ("megatron.core.transformer.moe.router", "gating moves the weight to current_device()"),
    ("megatron.core.optimizer.optimizer", "_scale/found_inf/dummy buffers device='cuda'"),
    ("megatron.core.optimizer.clip_grads", "norm/overflow buffers device='cuda'"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "torch.cuda.synchronize() before writing"),
    ("megatron.core.dist_checkpointing.strategies.async_utils", "synchronize(); flags on current_device()"),
    ("megatron.core.dist_checkpointing.strategies.state_dict_saver", "verify/failure flags device='cuda'"),
)


def cpu_mode_patches() -> list[Patch]:
    """Every patch :func:`enable_cpu_mode` applies, in order (imports Megatron-Core; applies nothing)."""
    import torch

    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mc_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    proxy = _TorchOnCpu(torch)
    patches = [
        Patch(importlib.import_module(name), "torch", proxy, why) for name, why in _PROXIED_MODULES
    ]
    build_groups = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__
    patches += [
        Patch(mc_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(),
              "RNG tracker fork: the CPU generator plays the CUDA one"),
        Patch(mc_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state),
              "RNG tracker fork: the CPU generator plays the CUDA one"),
        Patch(LanguageModule, "setup_embeddings_and_output_layer",
              _with_tensor_cuda_as_identity(LanguageModule.setup_embeddings_and_output_layer),
              "tied embeddings at PP>1: weight.data.cuda() before the embedding-group all-reduce"),
        Patch(fused_softmax, "get_default_causal_mask", _causal_mask_on_cpu,
              "causal mask built with device='cuda'"),
        Patch(p2p_communication, "_p2p_ops", _sending_copies(p2p_communication._p2p_ops),
              "gloo isend reads the live buffer; deallocate_output_tensor frees it while in flight"),
        Patch(token_dispatcher.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", _CpuStream(),
              "class-level D2H stream filled lazily with torch.cuda.Stream()"),
        Patch(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_host,
              "all_to_all split sizes must be numpy/lists; the original converts CUDA tensors only"),
        Patch(mc_optimizer, "clip_grad_by_total_norm_fp32",
              _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32),
              "asserts grad.type() == 'torch.cuda.FloatTensor'"),
        Patch(DistributedOptimizer, "_build_model_and_main_param_groups",
              classmethod(_with_cuda_type_names(build_groups)),
              "raises unless param.type() is a torch.cuda.* type name"),
    ]
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append(Patch(moe_utils, "te_general_gemm", None,
                             "never defined without Transformer Engine (NameError in router gating)"))
    return patches


# ------------------------------------------------------------------------------------- the switch


class _Holders:
    """CPU mode's patches (process-wide, like the modules they patch) and how many handles hold them."""

    def __init__(self):
        self.patches = PatchSet()
        self.count = 0


_HOLDERS = _Holders()


class CpuMode:
    """A handle on CPU mode; :meth:`disable` or leaving its ``with`` block releases it (once)."""

    def __init__(self):
        self._released = False

    @property
    def active(self) -> bool:
        """This handle still holds CPU mode."""
        return not self._released

    @property
    def patches(self) -> tuple[Patch, ...]:
        """The patches currently applied (shared by all handles)."""
        return _HOLDERS.patches.applied

    def disable(self) -> None:
        """Release this handle; the last release restores every patched attribute."""
        with _HOLDERS.patches.lock:
            if self._released:
                return
            self._released = True
            _HOLDERS.count -= 1
            if _HOLDERS.count == 0:
                _HOLDERS.patches.undo()

    def __enter__(self) -> "CpuMode":
        return self

    def __exit__(self, *exc_info) -> None:
        self.disable()


def enable_cpu_mode(*, force: bool = False) -> CpuMode:
    """Patch Megatron-Core's CUDA assumptions so its models, schedules, DDP and optimizer run on CPU.

    Returns a :class:`CpuMode` handle (also a context manager). Calling it again while active applies
    nothing new and returns another handle; the patches come out when every handle is released.
    Refuses with ``RuntimeError`` when CUDA is available, unless ``force=True`` (tests only).
    """
    import torch

    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "enable_cpu_mode() refuses to run Megatron-Core on CPU while CUDA is available; "
            "pass force=True if that is really what you want (tests only)"
        )
    with _HOLDERS.patches.lock:
        if _HOLDERS.count == 0:
            _HOLDERS.patches.apply(cpu_mode_patches())
        _HOLDERS.count += 1
        return CpuMode()


def is_cpu_mode_active() -> bool:
    """Whether any :class:`CpuMode` handle is held in this process."""
    return _HOLDERS.count > 0
