"""Megatron-Core adapter for dualpipe_plugin.

The adapter (schedule registry for ``get_forward_backward_func``, V / mirrored placement, parallel_state
groups, P2P, DDP hooks, distributed optimizer) lives in this package. For now it holds only
:mod:`dualpipe_plugin.megatron.cpu_mode`, the explicit opt-in that lets Megatron-Core 0.16 run on CPU
and gloo for CI and laptops. Importing this package does not import Megatron-Core.
"""

from dualpipe_plugin.megatron.cpu_mode import CpuMode, enable_cpu_mode, is_cpu_mode_active

__all__ = ["CpuMode", "enable_cpu_mode", "is_cpu_mode_active"]
