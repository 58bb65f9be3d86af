"""Megatron-Core adapter for dualpipe_plugin.

The adapter (schedule registry for ``get_forward_backward_func``, V / mirrored placement, parallel_state
groups, P2P, DDP hooks, distributed optimizer) will live in this package. For now it holds
:mod:`dualpipe_plugin.megatron.cpu_mode`, the explicit opt-in that runs Megatron-Core 0.16 on CPU and
gloo for CI and laptops. Importing this package imports neither torch nor Megatron-Core.
"""

from dualpipe_plugin.megatron.cpu_mode import (
    CpuMode,
    Patch,
    cpu_mode_patches,
    enable_cpu_mode,
    is_cpu_mode_active,
)

__all__ = ["CpuMode", "Patch", "cpu_mode_patches", "enable_cpu_mode", "is_cpu_mode_active"]
