"""Stand-ins for CUDA that CPU mode puts where Megatron hard-codes it (see :mod:`.cpu_mode` for where).

A :class:`TorchOnCpu` replaces one Megatron module's global ``torch``: it forwards everything to torch
except CUDA placement (factories with a CUDA ``device=`` build on the CPU) and ``torch.cuda``, which
answers for a CPU "device" whose every op is synchronous (:class:`CpuStream`, :class:`CpuEvent`, no-op
``synchronize``/``nvtx``, the CPU generator as the CUDA one). The ``with_*`` wrappers change a tensor
method only for the duration of one call. Nothing here patches anything by itself.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Callable

__all__ = [
    "CpuEvent", "CpuStream", "TorchOnCpu", "causal_mask_on_cpu", "move_to_host", "sending_copies",
    "with_cuda_as_identity", "with_cuda_type_names",
]


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


class CpuEvent:
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


class CpuStream:
    """A CUDA stream on a device where every op is synchronous: ordering is program order."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None):
        return event if event is not None else CpuEvent()

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

    Stream = CpuStream
    Event = CpuEvent
    nvtx = _NoNvtx

    def __init__(self, torch_module, *, available: bool = False, device_count: int = 0):
        self._torch = torch_module
        self._available = available
        self._device_count = device_count
        self._default_stream = CpuStream()

    def current_device(self):
        return self._torch.device("cpu")

    def is_available(self) -> bool:
        return self._available

    def device_count(self) -> int:
        return self._device_count

    def set_device(self, device) -> None:
        return None

    def synchronize(self, device=None) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def memory_allocated(self, device=None) -> int:
        """The training log's memory report: nothing is allocated on a CUDA device."""
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    def memory_stats(self, device=None) -> dict:
        return {}

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


class TorchOnCpu(types.ModuleType):
    """Bound to one Megatron module's global ``torch``; forwards everything but CUDA placement."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint")

    def __init__(self, torch_module, **cuda_answers):
        super().__init__("torch", "torch as seen by a Megatron module in dualpipe_plugin's CPU mode")
        object.__setattr__(self, "_torch", torch_module)
        object.__setattr__(self, "cuda", _CudaOnCpu(torch_module, **cuda_answers))
        for name in self._FACTORIES:
            object.__setattr__(self, name, _factory_on_cpu(getattr(torch_module, name)))

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_torch"), name)


def with_cuda_as_identity(function: Callable) -> Callable:
    """``function`` run with ``Tensor.cuda()`` and ``Module.cuda()`` returning the object itself, during
    the call only."""
    import torch

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda

    return wrapper


def with_cuda_type_names(function: Callable) -> Callable:
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


def sending_copies(p2p_ops: Callable) -> Callable:
    """``_p2p_ops`` that hands gloo a private copy of each tensor it sends."""

    @functools.wraps(p2p_ops)
    def wrapper(*, tensor_send_prev, tensor_send_next, **kwargs):
        if tensor_send_prev is not None:
            tensor_send_prev = tensor_send_prev.detach().clone()
        if tensor_send_next is not None:
            tensor_send_next = tensor_send_next.detach().clone()
        return p2p_ops(tensor_send_prev=tensor_send_prev, tensor_send_next=tensor_send_next, **kwargs)

    return wrapper


def move_to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for a CPU device: numpy when asked, else as is."""
    import torch

    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def causal_mask_on_cpu(sq: int):
    import torch

    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()
