"""Megatron-Core (0.16 and 0.19) and Megatron-LM's training loop on CPU and gloo: an explicit, undoable opt-in.

>>> from dualpipe_plugin.megatron import enable_cpu_mode
>>> with enable_cpu_mode():          # raises if CUDA is available, unless force=True
...     ...                          # parallel_state, GPTModel, DDP, get_forward_backward_func(), optimizer,
...                                  # and on 0.19 megatron.training.pretrain() itself

For CI and laptops. Nothing here runs at import (Megatron is imported inside :func:`enable_cpu_mode`
only). The mode is never active unless called; it is reference-counted (every call returns its own
:class:`CpuMode` handle, the patches go in once and come out when the last handle is released), and
releasing restores every patched attribute to the object it held before (one
:class:`~dualpipe_plugin.megatron.patching.PatchSet`). State *created* while the mode is on stays CPU
state (models, grad buffers, the RNG tracker's saved states, ``parallel_state``'s global memory buffer).

What is patched, and why, is listed patch by patch in :mod:`.cpu_patches` (each entry carries its reason;
``cpu_mode_patches()`` returns them for the installed release). In short:

* "proxy" modules: their global ``torch`` becomes :class:`~.cpu_standins.TorchOnCpu`, which forwards
  everything to torch except factories with a CUDA ``device=`` (built on the CPU) and ``torch.cuda``
  (a CPU "device" whose ops are synchronous: ``current_device() -> cpu``, no-op ``synchronize``, CPU
  ``Stream``/``Event``, the CPU generator as the CUDA one). RNG tracker, global memory buffer, DDP
  buffers, schedules, P2P buffers, MoE dispatcher/router/mappings, optimizers and clipping, distributed
  checkpointing, timers, the rerun state machine; on 0.19 also ``megatron.training``'s ``training``,
  ``common_utils``, ``dist_utils`` and ``checkpointing``.
* bindings: the RNG tracker's CUDA state get/set (the CPU generator), ``Tensor.cuda()`` as identity
  during tied-embedding set-up and ``get_model``, a CPU causal mask, numpy split sizes for the MoE
  all-to-all, CUDA type names for the optimizers' type checks, Megatron's dummy Adam state before a
  distributed-optimizer load and per-parameter Adam ``step`` after it (torch Adam without apex/TE);
  on 0.16 a private copy of every tensor a gloo ``isend`` reads (fixed upstream in 0.18); on 0.19
  ``initialize`` (CUDA asserted, ``device_count()`` gating the model-parallel groups and the RNG
  seeding, ``make`` of the dataset helpers the wheel already ships, the JIT warm-up that would compile
  on CPU and draw from the RNG).

Run on gloo with 1-4 processes (``tests/megatron/``): GPTModel from ``get_gpt_layer_local_spec`` (no
Transformer Engine, no apex), fp32 and bf16, TP=1 and 2; Megatron's own schedules (1F1B, interleaved)
and this package's; DDP with and without ``overlap_grad_reduce``; the distributed optimizer; MoE with the
alltoall dispatcher at EP=2; distributed checkpointing; on 0.19 ``megatron.training.pretrain()``.
Other paths (sequence parallel, fp16 loss scaling, grouped GEMM, the flex dispatcher, CUDA graphs,
Megatron's own ``overlap_moe_expert_parallel_comm``) may need more.

Pipeline settings on gloo (the config is the user's; CPU mode does not change it):
  * ``batch_p2p_comm=False`` with Megatron's interleaved schedule at PP=2: its batched
    ``send_forward_backward_recv_forward_backward`` posts two sends to the single peer and FIFO matching
    swaps activations and gradients of equal shape (wrong losses, no error; a known Megatron issue on any
    backend). Megatron-LM 0.19's default ``overlap_p2p_comm=True`` already gives ``batch_p2p_comm=False``.
"""

from __future__ import annotations

from dualpipe_plugin.megatron.cpu_patches import cpu_mode_patches
from dualpipe_plugin.megatron.patching import Patch, PatchSet

__all__ = ["CpuMode", "Patch", "enable_cpu_mode", "is_cpu_mode_active", "cpu_mode_patches"]

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
