"""Counting activation memory on any device: the bytes autograd saves, for as long as anything holds them.

:class:`SavedTensorMeter` installs ``torch.autograd.graph.saved_tensors_hooks`` while it is entered. Every
tensor autograd saves in a forward is recorded by its storage (two views of one storage count once;
parameters, and anything else given as ``exclude``, never count) and stays counted until the tensor
object dies: when the graph is freed by a backward, or later when a deferred weight-gradient closure that
kept it has run. :meth:`watch_store` also counts what the closures of a
:class:`~dualpipe_plugin.runtime.weight_grad.WeightGradStore` hold besides saved tensors (the output
gradients a deferred ``W`` needs), from the moment an ``I`` defers them until its ``W`` runs.

``live`` is the current total and ``peak`` its maximum since the last :meth:`reset_peak`. This is what the
profiler calls a layer's activation bytes and what the memory benchmark compares the planner's estimate
with on CPU, where there is no allocator to ask (on a GPU, ``torch.cuda.max_memory_allocated`` says the
same and more). Transient buffers inside an op (a matmul's workspace, the gradient flowing through a
backward) are not saved tensors and are not counted.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

__all__ = ["SavedTensorMeter", "storage_key", "tensor_bytes", "tensors_in"]


def storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    """(device, address) of a tensor's storage; None for an empty one."""
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (str(tensor.device), storage.data_ptr())


def tensor_bytes(values: Any) -> int:
    """Bytes of the distinct storages of the tensors in ``values`` (a tensor, or nested tuples/lists)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors_in(values):
        key = storage_key(tensor)
        if key is not None:
            seen[key] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def tensors_in(values: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``values``: a tensor, or tuples, lists and dicts of them (nested)."""
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (tuple, list)):
        for value in values:
            yield from tensors_in(value)
    elif isinstance(values, dict):
        for value in values.values():
            yield from tensors_in(value)


class SavedTensorMeter:
    """Live bytes of saved activations (see the module docstring). Not thread-safe; one per process."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {key for key in map(storage_key, exclude) if key is not None}
        self._storages: dict[tuple[str, int], list[int]] = {}  # key -> [nbytes, live tensor objects]
        self._tracked: set[int] = set()
        self.live = 0
        self.peak = 0

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never count these tensors' storages (parameters, buffers, inputs held anyway)."""
        self._excluded.update(key for key in map(storage_key, tensors) if key is not None)

    def reset_peak(self) -> None:
        self.peak = self.live

    def counted_bytes(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the counted storages among these tensors' storages."""
        keys = {key for key in map(storage_key, tensors) if key is not None}
        return sum(self._storages[key][0] for key in keys if key in self._storages)

    # -- counting --------------------------------------------------------------------------------------
    def _track(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key is None or key in self._excluded or id(tensor) in self._tracked:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [tensor.untyped_storage().nbytes(), 0]
            self.live += entry[0]
            if self.live > self.peak:
                self.peak = self.live
        entry[1] += 1
        self._tracked.add(id(tensor))
        weakref.finalize(tensor, self._release, key, id(tensor))

    def _release(self, key: tuple[str, int], ident: int) -> None:
        self._tracked.discard(ident)
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._storages[key]
            self.live -= entry[0]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._track(tensor)
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @contextmanager
    def counting(self) -> Iterator["SavedTensorMeter"]:
        """Count what autograd saves inside this block (the forwards); counted tensors stay counted
        until they die, inside the block or after it."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    # -- the W store -----------------------------------------------------------------------------------
    def watch_store(self, store: Any) -> None:
        """Count the tensors the deferred closures of ``store`` hold (until its ``W`` runs them).

        Wraps this store object's ``defer`` (an instance attribute; :meth:`unwatch_store` removes it): a
        closure deferred during an ``I`` is inspected for the tensors it captured, parameters excluded."""
        original = type(store).defer

        def defer(closure):
            if store.capturing:
                for cell in getattr(closure, "__closure__", None) or ():
                    try:
                        contents = cell.cell_contents
                    except ValueError:  # an empty cell
                        continue
                    for tensor in tensors_in(contents):
                        if not isinstance(tensor, torch.nn.Parameter):
                            self._track(tensor)
            return original(store, closure)

        store.defer = defer

    @staticmethod
    def unwatch_store(store: Any) -> None:
        store.__dict__.pop("defer", None)
