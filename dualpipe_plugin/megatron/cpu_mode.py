"""Megatron-Core on CPU/gloo (draft; patch list being discovered)."""

from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["CpuMode", "enable_cpu_mode", "is_cpu_mode_active"]

_MISSING = object()


def _is_cuda_device(device: Any) -> bool:
    import torch

    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in torch's factories
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _on_cpu(fn: Callable) -> Callable:
    """``fn`` with a CUDA ``device=`` argument rewritten to CPU."""

    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__wrapped__ = fn
    return wrapper


class _CpuEvent:
    """A CUDA event on a device whose every op is synchronous: always complete."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


class _CpuStream:
    """A CUDA stream on a device whose every op is synchronous: ordering is program order."""

    def __init__(self, device=None, priority=0, **kwargs):
        pass

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        return None

    def query(self):
        return True


class _CudaNamespaceOnCpu:
    """Stands in for ``torch.cuda`` inside one Megatron module: the device is the CPU."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def current_device(self):
        return self._torch.device("cpu")

    def synchronize(self, device=None):
        return None

    def is_available(self):
        return False

    Stream = _CpuStream
    Event = _CpuEvent

    def stream(self, stream):
        return contextlib.nullcontext()

    def current_stream(self, device=None):
        return _DEFAULT_STREAM

    default_stream = current_stream

    def get_rng_state(self, device="cuda"):
        return self._torch.get_rng_state()

    def set_rng_state(self, new_state, device="cuda"):
        self._torch.set_rng_state(new_state)

    def manual_seed(self, seed):
        self._torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def __getattr__(self, name):
        return getattr(self._torch.cuda, name)


_DEFAULT_STREAM = _CpuStream()


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside one Megatron module (bound to that module's global ``torch``)."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint")

    def __init__(self, torch_module):
        super().__init__("torch")
        object.__setattr__(self, "_torch", torch_module)
        object.__setattr__(self, "cuda", _CudaNamespaceOnCpu(torch_module))
        for name in self._FACTORIES:
            object.__setattr__(self, name, _on_cpu(getattr(torch_module, name)))

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_torch"), name)


def _move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    import torch

    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _causal_mask_cpu(sq: int):
    import torch

    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _with_tensor_cuda_as_identity(method: Callable) -> Callable:
    """``method`` run with ``Tensor.cuda()`` returning the tensor itself (only during the call)."""
    import functools

    import torch

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return wrapper


def _sending_copies(p2p_ops: Callable) -> Callable:
    import functools

    @functools.wraps(p2p_ops)
    def wrapper(*, tensor_send_prev, tensor_send_next, **kwargs):
        if tensor_send_prev is not None:
            tensor_send_prev = tensor_send_prev.detach().clone()
        if tensor_send_next is not None:
            tensor_send_next = tensor_send_next.detach().clone()
        return p2p_ops(tensor_send_prev=tensor_send_prev, tensor_send_next=tensor_send_next, **kwargs)

    return wrapper


def _with_cuda_type_names(function: Callable) -> Callable:
    """``function`` run with ``Tensor.type()`` of a CPU tensor naming the CUDA type (only during the call)."""
    import functools

    import torch

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def type_(self, dtype=None, non_blocking=False, **kw):
            name = original(self, dtype, non_blocking, **kw)
            if dtype is None and isinstance(name, str) and self.device.type == "cpu":
                return name.replace("torch.", "torch.cuda.", 1)
            return name

        torch.Tensor.type = type_
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapper


@dataclass(frozen=True, slots=True)
class _Patch:
    owner: Any
    attr: str
    replacement: Any
    why: str


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.holders = 0
        self.applied: list[tuple[Any, str, Any, Any]] = []


_STATE = _State()


def _build_patches() -> list[_Patch]:
    import torch

    from megatron.core.tensor_parallel import random as mc_random

    cpu_torch = _TorchOnCpu(torch)
    patches: list[_Patch] = []
    patches += [
        _Patch(mc_random, "torch", cpu_torch, "RNG tracker: torch.cuda.get_rng_state/manual_seed -> CPU generator"),
        _Patch(mc_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(), "RNG tracker fork"),
        _Patch(mc_random, "_set_cuda_rng_state", lambda s, *a, **k: torch.set_rng_state(s), "RNG tracker fork"),
    ]
    from megatron.core.fusions import fused_softmax

    patches.append(_Patch(fused_softmax, "get_default_causal_mask", _causal_mask_cpu, "causal mask device='cuda'"))
    from megatron.core.models.common.language_module import language_module

    lm = language_module.LanguageModule
    patches.append(_Patch(lm, "setup_embeddings_and_output_layer",
                          _with_tensor_cuda_as_identity(lm.setup_embeddings_and_output_layer), "weight.data.cuda()"))
    from megatron.core.pipeline_parallel import p2p_communication

    patches.append(_Patch(p2p_communication, "_p2p_ops", _sending_copies(p2p_communication._p2p_ops),
                          "async gloo isend reads the live buffer; deallocate_output_tensor frees it"))
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append(_Patch(moe_utils, "te_general_gemm", None, "NameError without TE"))
    from megatron.core.transformer.moe import token_dispatcher

    patches.append(_Patch(token_dispatcher, "maybe_move_tensor_to_cpu", _move_to_host, "numpy split sizes"))
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
    patches.append(_Patch(DistributedOptimizer, "_build_model_and_main_param_groups",
                          classmethod(_with_cuda_type_names(build.__func__)), "param.type() == 'torch.cuda.FloatTensor'"))
    from megatron.core.optimizer import clip_grads, optimizer as mc_optimizer

    patches.append(_Patch(mc_optimizer, "clip_grad_by_total_norm_fp32",
                          _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32), "grad.type() assert"))
    import importlib
    for modname, why in _TORCH_PROXIED:
        mod = importlib.import_module(modname)
        patches.append(_Patch(mod, "torch", cpu_torch, why))
    return patches


_TORCH_PROXIED = [
    ("megatron.core.distributed.param_and_grad_buffer", "grad buffers on torch.cuda.current_device()"),
    ("megatron.core.pipeline_parallel.schedules", "total_num_tokens = torch.zeros(device='cuda')"),
    ("megatron.core.pipeline_parallel.p2p_communication", "recv buffers on current_device; cuda.synchronize"),
    ("megatron.core.transformer.moe.token_dispatcher", "cuda_dtoh_stream, current_stream, stream()"),
    ("megatron.core.transformer.moe.router", "router params/buffers on current_device"),
    ("megatron.core.transformer.moe.experts", "expert buffers on current_device"),
    ("megatron.core.transformer.moe.moe_utils", "aux-loss tracker zeros(device='cuda'), current_stream"),
    ("megatron.core.tensor_parallel.mappings", "gather/scatter outputs on current_device"),
    ("megatron.core.optimizer.optimizer", "_scale/found_inf tensors device='cuda'"),
    ("megatron.core.optimizer.distrib_optimizer", "shard buffers on current_device"),
    ("megatron.core.optimizer.clip_grads", "norm tensors device='cuda'"),
    ("megatron.core.utils", "GlobalMemoryBuffer.get_tensor on torch.cuda.current_device()"),
]


class CpuMode:
    """Handle of one ``enable_cpu_mode()`` call; ``disable()`` (or leaving the ``with``) releases it."""

    def __init__(self):
        self._released = False

    @property
    def active(self) -> bool:
        return not self._released

    def disable(self) -> None:
        with _STATE.lock:
            if self._released:
                return
            self._released = True
            _STATE.holders -= 1
            if _STATE.holders == 0:
                for owner, attr, original, _ in reversed(_STATE.applied):
                    if original is _MISSING:
                        delattr(owner, attr)
                    else:
                        setattr(owner, attr, original)
                _STATE.applied.clear()

    def __enter__(self) -> "CpuMode":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()


def enable_cpu_mode(*, force: bool = False) -> CpuMode:
    import torch

    if torch.cuda.is_available() and not force:
        raise RuntimeError("CUDA is available: refusing CPU mode (pass force=True)")
    with _STATE.lock:
        if _STATE.holders == 0:
            for patch in _build_patches():
                original = patch.owner.__dict__.get(patch.attr, _MISSING) if isinstance(
                    patch.owner, (type, types.ModuleType)) else getattr(patch.owner, patch.attr, _MISSING)
                setattr(patch.owner, patch.attr, patch.replacement)
                _STATE.applied.append((patch.owner, patch.attr, original, patch.replacement))
        _STATE.holders += 1
        return CpuMode()


def is_cpu_mode_active() -> bool:
    return _STATE.holders > 0
