"""CPU mode's patch table: which Megatron binding gets which CPU stand-in, and why (see :mod:`.cpu_mode`).

:func:`cpu_mode_patches` builds the list for the installed Megatron-Core: the patches of ``megatron.core``
that every supported release needs, the ones only some releases need (each guarded by what it targets,
not by a version string, except where the behaviour changed without a name changing), and, where the
installed wheel ships Megatron-LM's ``megatron.training`` (megatron-core >= 0.19), the patches its
``pretrain()`` needs. Building the list imports Megatron; applying it is :mod:`.cpu_mode`'s job.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from dualpipe_plugin.megatron.compat import megatron_core_version, ships_megatron_training
from dualpipe_plugin.megatron.cpu_standins import (
    CpuStream,
    TorchOnCpu,
    causal_mask_on_cpu,
    move_to_host,
    sending_copies,
    with_cuda_as_identity,
    with_cuda_type_names,
)
from dualpipe_plugin.megatron.patching import Patch, everywhere

__all__ = ["cpu_mode_patches"]

_PROXIED_CORE = (
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
    ("megatron.core.timers", "Timer start/stop(barrier) synchronize; timers.log gathers on current_device()"),
    ("megatron.core.rerun_state_machine", "result flags device='cuda'; saves torch.cuda.get_rng_state()"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RoPE's inv_freq on current_device()"),
)
"""Modules whose global ``torch`` becomes the CPU proxy (every one that exists in the installed release)."""

_PROXIED_TRAINING = (
    ("megatron.training.training", "startup timestamps all-reduced as device='cuda' tensors; get_model's "
     "DDP stream; loss dict, exit-duration and data-flag tensors device='cuda'; empty_cache; memory stats"),
    ("megatron.training.utils.common_utils", "l2 norms and model-parallel flag reductions on current_device()"),
    ("megatron.training.models.dist_utils", "builder path: DDP wrap under torch.cuda.Stream; model.cuda()"),
    ("megatron.training.checkpointing", "iteration all-reduce device='cuda'; torch.cuda.get/set_rng_state"),
)
"""Megatron-LM's training package (shipped by megatron-core >= 0.19): its CUDA placements."""


def _proxies(modules: tuple[tuple[str, str], ...], proxy) -> list[Patch]:
    patches = []
    for name, why in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # not in this release
        patches.append(Patch(module, "torch", proxy, why))
    return patches


def _core_patches(torch) -> list[Patch]:
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mc_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    build_groups = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__
    patches = [
        Patch(mc_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(),
              "RNG tracker fork: the CPU generator plays the CUDA one"),
        Patch(mc_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state),
              "RNG tracker fork: the CPU generator plays the CUDA one (without it no crash: the CUDA write is "
              "deferred forever and the tracker never restores its state, so losses change)"),
        Patch(LanguageModule, "setup_embeddings_and_output_layer",
              with_cuda_as_identity(LanguageModule.setup_embeddings_and_output_layer),
              "tied embeddings at PP>1: weight.data.cuda() before the embedding-group all-reduce"),
        Patch(fused_softmax, "get_default_causal_mask", causal_mask_on_cpu, "causal mask built with device='cuda'"),
        Patch(token_dispatcher.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", CpuStream(),
              "class-level D2H stream filled lazily with torch.cuda.Stream()"),
        Patch(token_dispatcher, "maybe_move_tensor_to_cpu", move_to_host,
              "all_to_all split sizes must be numpy/lists; the original converts CUDA tensors only"),
        Patch(mc_optimizer, "clip_grad_by_total_norm_fp32", with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32),
              "asserts grad.type() == 'torch.cuda.FloatTensor'"),
        Patch(DistributedOptimizer, "_build_model_and_main_param_groups", classmethod(with_cuda_type_names(build_groups)),
              "raises unless param.type() is a torch.cuda.* type name"),
        Patch(mc_optimizer.Float16OptimizerWithFloat16Params, "__init__",
              with_cuda_type_names(mc_optimizer.Float16OptimizerWithFloat16Params.__init__),
              "bf16 without the distributed optimizer: raises unless param.type() is a torch.cuda.* type name"),
        Patch(DistributedOptimizer, "sharded_state_dict", _state_before_loading(DistributedOptimizer.sharded_state_dict),
              "not CUDA, the install CPU mode implies (torch Adam, no apex/TE): loading asks state_dict() for "
              "one Adam 'step' before torch Adam has any state; give it Megatron's dummy state first"),
        Patch(DistributedOptimizer, "load_state_dict", _own_step_per_param(DistributedOptimizer.load_state_dict),
              "not CUDA (torch Adam): fp32 main params are views of leaf params (load under no_grad), and every "
              "parameter must get its own Adam 'step' = the checkpoint's, not one shared dummy"),
    ]
    if megatron_core_version() < (0, 18):
        # Fixed upstream in 0.18 (the schedules wait for a send before freeing its output).
        patches.append(Patch(p2p_communication, "_p2p_ops", sending_copies(p2p_communication._p2p_ops),
                             "gloo isend reads the live buffer; deallocate_output_tensor frees it while in flight"))
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append(Patch(moe_utils, "te_general_gemm", None,
                             "never defined without Transformer Engine (NameError in router gating)"))
    return patches


def _training_patches(torch) -> list[Patch]:
    from megatron.training import initialize, training
    from megatron.training.utils import common_utils

    return [
        *everywhere(common_utils, "get_device_arch_version", lambda original: _no_gpu_arch,
                    "validate_args asks the GPU architecture (CUDA device properties) when TP or CP > 1; "
                    "no GPU answers 0, below every architecture, so the pre-Blackwell checks apply"),
        Patch(initialize, "torch", TorchOnCpu(torch, available=True, device_count=1),
              "initialize_megatron asserts CUDA; device_count() gates the model-parallel groups and the RNG "
              "tracker's seeding: the proxy reports one device, set_device is a no-op"),
        Patch(initialize, "_compile_dependencies", _prebuilt_dependencies,
              "rank 0 runs make in core/datasets; the wheel ships the built helpers and no Makefile"),
        Patch(initialize, "_warmup_jit_function", lambda *a, **k: None,
              "warms torch.compile'd fusions on device='cuda' tensors: on CPU it would compile with Inductor "
              "and draw from the RNG (losses change); the fusions are off on CPU"),
        Patch(training, "get_model", with_cuda_as_identity(training.get_model),
              "module.cuda(current_device()) even with --use-cpu-initialization"),
    ]


def _no_gpu_arch() -> int:
    return 0


def _prebuilt_dependencies() -> None:
    import torch.distributed as dist
    from megatron.core.datasets import helpers_cpp  # noqa: F401  (fails loudly if really missing)

    if dist.is_initialized():
        dist.barrier()


def _state_before_loading(sharded_state_dict: Callable) -> Callable:
    @functools.wraps(sharded_state_dict)
    def wrapper(self, *args, **kwargs):
        is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, *args, **kwargs)

    return wrapper


def _own_step_per_param(load_state_dict: Callable) -> Callable:
    import torch

    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict, *args, **kwargs):
        with torch.no_grad():
            result = load_state_dict(self, state_dict, *args, **kwargs)
        steps = {group["step"] for group in self.optimizer.param_groups if group.get("step") is not None}
        if len(steps) == 1:
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(step, dtype=state["step"].dtype)
        return result

    return wrapper


def cpu_mode_patches() -> list[Patch]:
    """Every patch :func:`~dualpipe_plugin.megatron.enable_cpu_mode` applies, in order (imports
    Megatron-Core, and Megatron-LM's training package where the wheel ships it; applies nothing)."""
    import torch

    proxy = TorchOnCpu(torch)
    patches = _proxies(_PROXIED_CORE, proxy) + _core_patches(torch)
    if ships_megatron_training():
        patches += _proxies(_PROXIED_TRAINING, proxy) + _training_patches(torch)
    return patches
