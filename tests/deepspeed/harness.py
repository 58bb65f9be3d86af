"""DeepSpeed test groundwork: a tiny PipelineModule, a config builder, data, a spawned rank and a reference.

The pieces compare DeepSpeed's own pipeline engine (TrainSchedule) with a single-process, unpipelined
reference in plain torch, and later our DualPipe engines with both:

>>> from dualpipe_plugin.launch import run_local
>>> case = Case(num_stages=2, micro_batches=4)
>>> results = run_local(run_deepspeed_rank, case.world_size, args=(case,))   # one RankResult per rank
>>> ref = reference_run(case)
>>> assert all(r.losses == ref.losses for r in results)
>>> merged = merge_rank_params(results)                                       # one replica, global names
>>> assert all(torch.equal(merged[n], ref.params[n]) for n in merged)

Another engine on the same model/config/data: ``args=(case, partial(initialize_pipeline_engine, MyEngine))``.

Parameters are keyed by a GLOBAL name that does not depend on the partition: DeepSpeed registers layer
``i`` of the spec list as submodule ``str(i)`` and a tied module as ``tied_modules.<key>``, so
``"3.weight"`` or ``"tied_modules.proj.weight"`` name the same tensor for any number of stages.

[Note: what the reference reproduces]
DeepSpeed's arithmetic, step by step, so that fp32 runs compare bit for bit:
  * each micro-batch's loss is divided by gradient_accumulation_steps before backward (DeepSpeedEngine
    .backward on the last stage; the engine's output hook then leaves the gradient alone);
  * gradients accumulate in ``.grad`` over the micro-batches of one data-parallel replica;
  * a tied weight whose uses sit on different stages has one copy per stage; each copy accumulates its
    own uses' gradients and the copies are summed once at the end (ReduceTiedGrads) - not per
    micro-batch, which is what a single shared module would do;
  * data-parallel replicas are summed and multiplied by 1/dp (ReduceGrads, postscale default);
  * fp32 without ZeRO clips with DeepSpeed's ``clip_grad_norm_(mpu=grid)``, whose norm counts only the
    parameters of pipeline stage 0 (``mpu.get_model_parallel_rank() == 0`` is the stage index inside the
    pipe group) - reproduced by ``_clip_stage0_``; ZeRO-1 and bf16 use the global norm (``_clip_global_``);
  * the loss train_batch reports is (sum of micro-batch losses) / gas, averaged over replicas.
The reference runs with one intra-op thread, like the spawned ranks, so matmul reductions match.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_plugin.launch import run_local
from tests.runtime.harness import one_thread

__all__ = [
    "Case",
    "RankResult",
    "RunResult",
    "DenseTanh",
    "StagedDenseTanh",
    "TiedProjection",
    "tied_output_fn",
    "mse_loss",
    "layer_specs",
    "build_pipeline_module",
    "stage_bounds",
    "ds_config",
    "micro_batches_for",
    "data_iter",
    "skip_shm_comm_build",
    "run_deepspeed_rank",
    "run_deepspeed_cases",
    "initialize_pipeline_engine",
    "client_optimizer",
    "merge_rank_params",
    "launch_case",
    "assert_bit_exact",
    "reference_run",
    "params_max_diff",
    "run_checkpoint_rank",
    "run_optimizer_refusal_rank",
    "run_forward_refusal_rank",
    "Leg",
    "run_legs_rank",
    "MoEDense",
]

TIED_KEY = "proj"


# --- the model ---------------------------------------------------------------------------------------


def _seeded_uniform_(tensor: torch.Tensor, seed: int, bound: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(torch.empty(tensor.shape).uniform_(-bound, bound, generator=generator))


class DenseTanh(nn.Module):
    """``tanh(x @ W.T + b)``; its initial values depend only on ``seed`` (not on the global RNG)."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        bound = 1.0 / width**0.5
        _seeded_uniform_(self.linear.weight, 2 * seed, bound)
        _seeded_uniform_(self.linear.bias, 2 * seed + 1, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.matmul_dtype = y.dtype  # what the last forward's matmul ran in (torch_autocast tests)
        return torch.tanh(y)


class StagedDenseTanh(DenseTanh):
    """A DenseTanh that also speaks the overlap protocol (``sub_stages``): one compute sub-stage, its forward.

    With these layers a chunk can be a StagedChunk, so ``"overlap": true`` runs F&B pairs through the
    overlap engine (nothing to hide here; the point is that the path gives the same numbers).
    """

    def sub_stages(self):
        from dualpipe_plugin.runtime.staged import ComputeStage

        return [ComputeStage("dense", self.forward)]


class _Expert(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class MoEDense(nn.Module):
    """``x + MoE(x)``: DeepSpeed's own ``deepspeed.moe.layer.MoE`` (top-1 gate, no random token selection,
    capacity for every token, so the math does not depend on the order micro-batches run in), with
    ``num_experts`` experts over expert-parallel groups of ``ep_size`` data-parallel ranks.

    Every expert starts from values of its own (:func:`seed_experts`), so a loader that puts an expert's
    weights on another expert is caught."""

    def __init__(self, width: int, seed: int, num_experts: int = 4, ep_size: int = 2):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.seed = seed
        self.moe = MoE(width, _Expert(width), num_experts=num_experts, ep_size=ep_size, k=1, use_rts=False,
                       capacity_factor=float(num_experts), min_capacity=0)
        _seeded_uniform_(self.moe.deepspeed_moe.gate.wg.weight, 2 * seed, 1.0 / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.moe(x)
        return x + out


def seed_experts(model, case: "Case") -> None:
    """Give every expert of the built PipelineModule values seeded by (layer seed, GLOBAL expert id); the
    expert-parallel rank is the data-parallel index modulo ep_size, as DeepSpeed forms its groups."""
    ep_rank = model._grid.get_data_parallel_id() % case.ep_size
    for layer in model.modules():
        if isinstance(layer, MoEDense):
            experts = layer.moe.deepspeed_moe.experts.deepspeed_experts
            for local, expert in enumerate(experts):
                global_id = ep_rank * len(experts) + local
                _seeded_uniform_(expert.fc.weight, 1000 * layer.seed + 2 * global_id, 0.2)
                _seeded_uniform_(expert.fc.bias, 1000 * layer.seed + 2 * global_id + 1, 0.2)


class TiedProjection(nn.Module):
    """A square projection without bias, used as ``x @ W.T`` at the input and ``x @ W`` at the output."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, width))
        _seeded_uniform_(self.weight, 2 * seed, 1.0 / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LowRankAdapted(nn.Module):
    """A LoRA-style wrapper a script injects into a built layer: ``linear(x) + up(down(x))``."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.linear = linear
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.up(self.down(x))


def tied_output_fn(module: TiedProjection, x: torch.Tensor) -> torch.Tensor:
    """The output use of the tied projection (its transpose), a ``TiedLayerSpec.forward_fn``."""
    return F.linear(x, module.weight.t())


def mse_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The pipeline's ``loss_fn``; computed in fp32 so bf16 runs report comparable losses."""
    return F.mse_loss(outputs.float(), labels.float())


# --- one test case ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Everything a DeepSpeed run and its reference need; picklable, so it travels to spawned ranks."""

    num_stages: int = 2
    dp: int = 1
    num_layers: int = 8
    """DenseTanh layers; with ``tied`` two more specs wrap them (tied input and output projection)."""
    width: int = 32
    tied: bool = False
    partition_method: str = "uniform"
    micro_batches: int = 4
    micro_batch_size: int = 3
    steps: int = 3
    optimizer: str = "sgd"
    """'sgd' (torch SGD, no momentum) or 'adam' (torch Adam via DeepSpeed's ``torch_adam``, not AdamW)."""
    lr: float = 0.05
    zero_stage: int = 0
    bf16: bool = False
    bf16_fp32_accumulation: bool = False
    """``"data_types": {"grad_accum_dtype": "fp32"}``: with ZeRO-1, DeepSpeed's BF16_Optimizer (fp32 gradients)."""
    gradient_clipping: float = 0.0
    activation_checkpoint_interval: int = 0
    seed: int = 0
    eval_after: bool = False
    """Run one ``eval_batch`` on fresh data after training (reported as RankResult.eval_loss)."""
    pipeline: dict = field(default_factory=dict)
    """Extra keys for the JSON config's ``"pipeline"`` dict (DeepSpeed copies it verbatim)."""
    keep_shm_comm: bool = False
    """Let DeepSpeed JIT-build its shared-memory comm op (~20 s once per machine); see skip_shm_comm_build."""
    staged: bool = False
    """Build the dense layers as StagedDenseTanh (the overlap protocol)."""
    plugin: bool = False
    """``import dualpipe_plugin.deepspeed`` in the rank before building the model (our engine; the schedule
    comes from ``pipeline={"schedule": ...}``)."""
    autocast: bool = False
    """DeepSpeed's ``"torch_autocast": {"enabled": true, "dtype": "bfloat16"}`` (fp32 parameters)."""
    frozen: tuple[str, ...] = ()
    """Global parameter names set to ``requires_grad=False`` between building the module and initialize."""
    moe: tuple[int, ...] = ()
    """Indices of the dense layers that are MoEDense instead (DeepSpeed MoE, 4 experts, ep_size below)."""
    ep_size: int = 2
    client: str = ""
    """What the script passes to ``deepspeed.initialize`` besides the model (:func:`client_optimizer`):
    "" (model_parameters; the config's optimizer), "adamw" (a pre-built AdamW over two groups and a
    LambdaLR bound to it), "layerwise" (the same with the decay group's lr scaled by the building rank's
    stage), "groups" (the two groups as model_parameters; the config's AdamW and WarmupDecayLR),
    "callable" (the two groups, an optimizer callable and a scheduler callable)."""

    @property
    def world_size(self) -> int:
        return self.num_stages * self.dp


@dataclass(frozen=True)
class RankResult:
    rank: int
    stage_id: int
    dp_id: int
    losses: list[float]
    """What ``engine.train_batch()`` returned, per step (identical on every rank of a pipeline)."""
    params: dict[str, torch.Tensor]
    """This rank's parameters after the last step, fp32 copies, keyed by global name."""
    eval_loss: float | None = None
    extras: dict = field(default_factory=dict)
    """A copy of ``engine.harness_extras`` if the engine has one (engines under test report through it)."""
    engine: str = ""
    """The engine's class name and, for ours, its schedule (``"DualPipeEngine:dualpipev"``)."""


@dataclass(frozen=True)
class RunResult:
    losses: list[float]
    params: dict[str, torch.Tensor]
    eval_loss: float | None = None


def layer_specs(case: Case) -> list:
    """The DeepSpeed layer specs: ``num_layers`` DenseTanh, optionally between a tied projection pair."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    layer = StagedDenseTanh if case.staged else DenseTanh
    dense = [LayerSpec(layer, case.width, seed=case.seed * 1000 + i + 1) for i in range(case.num_layers)]
    if case.moe:
        dense = [LayerSpec(MoEDense, case.width, seed=case.seed * 1000 + i + 1, ep_size=case.ep_size) if i in case.moe
                 else spec for i, spec in enumerate(dense)]
    if not case.tied:
        return dense
    tied_seed = case.seed * 1000
    return [
        TiedLayerSpec(TIED_KEY, TiedProjection, case.width, seed=tied_seed),
        *dense,
        TiedLayerSpec(TIED_KEY, TiedProjection, case.width, seed=tied_seed, forward_fn=tied_output_fn),
    ]


def build_pipeline_module(case: Case, **kwargs):
    """A ``PipelineModule`` over ``layer_specs(case)``; needs an initialised process group."""
    from deepspeed.pipe import PipelineModule

    module = PipelineModule(
        layers=layer_specs(case),
        num_stages=case.num_stages,
        loss_fn=mse_loss,
        partition_method=case.partition_method,
        activation_checkpoint_interval=case.activation_checkpoint_interval,
        **kwargs,
    )
    if case.moe:
        seed_experts(module, case)
    return module


def _spec_param_counts(case: Case) -> list[int]:
    counts = [case.width * case.width + case.width] * case.num_layers
    return [case.width * case.width, *counts, case.width * case.width] if case.tied else counts


def stage_bounds(case: Case) -> list[int]:
    """DeepSpeed's partition of the spec list (``PipelineModule.parts``), computed without a process group."""
    from deepspeed.runtime import utils as ds_utils

    num_specs = case.num_layers + (2 if case.tied else 0)
    method = case.partition_method.lower()
    if method == "uniform":
        return list(ds_utils.partition_uniform(num_items=num_specs, num_parts=case.num_stages))
    if method == "parameters":
        return list(ds_utils.partition_balanced(weights=_spec_param_counts(case), num_parts=case.num_stages))
    raise ValueError(f"partition_method must be 'uniform' or 'parameters', got {case.partition_method!r}")


# --- the DeepSpeed config ------------------------------------------------------------------------------


def ds_config(case: Case) -> dict[str, Any]:
    """A DeepSpeed JSON config (as a dict) for ``case``."""
    if case.optimizer == "sgd":
        optimizer = {"type": "SGD", "params": {"lr": case.lr}}
    elif case.optimizer == "adam":
        # torch_adam: plain torch.optim.Adam (FusedAdam/CPUAdam would JIT-compile C++ ops);
        # adam_w_mode false: DeepSpeed's "Adam" otherwise means AdamW.
        optimizer = {"type": "Adam", "params": {"lr": case.lr, "torch_adam": True, "adam_w_mode": False}}
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {case.optimizer!r}")
    if case.client in ("groups",):
        optimizer = {"type": "AdamW", "params": {"lr": case.lr, "torch_adam": True}}
    config: dict[str, Any] = {} if case.client in ("adamw", "layerwise", "callable") else {"optimizer": optimizer}
    if case.client == "groups":
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": case.lr, "warmup_num_steps": 2, "total_num_steps": 10}}
    config.update({
        "train_micro_batch_size_per_gpu": case.micro_batch_size,
        "gradient_accumulation_steps": case.micro_batches,
        "train_batch_size": case.micro_batch_size * case.micro_batches * case.dp,
        "zero_optimization": {"stage": case.zero_stage},
        "bf16": {"enabled": case.bf16},
        "gradient_clipping": case.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    if case.autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if case.bf16_fp32_accumulation:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if case.zero_stage > 0:
        config["zero_allow_untested_optimizer"] = True  # ZeRO lists torch SGD as "untested"
    if case.pipeline:
        config["pipeline"] = dict(case.pipeline)
    return config


# --- data ----------------------------------------------------------------------------------------------


def micro_batches_for(case: Case, step: int, dp_id: int, *, split: str = "train") -> list[tuple]:
    """The (inputs, labels) micro-batches replica ``dp_id`` consumes at ``step``; a pure function."""
    salt = {"train": 0, "eval": 1}[split]
    batches = []
    for micro in range(case.micro_batches):
        seed = ((case.seed * 7919 + salt) * 1009 + step) * 1013 + dp_id * 101 + micro
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(case.micro_batch_size, case.width, generator=generator)
        y = torch.randn(case.micro_batch_size, case.width, generator=generator) * 0.5
        if case.bf16:
            x = x.to(torch.bfloat16)
        batches.append((x, y))
    return batches


def data_iter(case: Case, step: int, dp_id: int, *, split: str = "train") -> Iterator[tuple]:
    """An iterator over ``micro_batches_for(...)``: what ``train_batch(data_iter)`` pulls from."""
    return iter(micro_batches_for(case, step, dp_id, split=split))


# --- a DeepSpeed rank ------------------------------------------------------------------------------------


def skip_shm_comm_build() -> None:
    """Tell DeepSpeed its CPU shared-memory comm op is unavailable, so ``init_distributed`` skips its JIT build.

    ``TorchBackend.__init__`` calls ``build_shm_op()``, which JIT-compiles ``deepspeed_shm_comm`` (~20 s on
    2 cores, cached in ``$TORCH_EXTENSIONS_DIR``) whenever ``deepspeed.ops.__compatible_ops__`` marks it
    compatible - even when torch.distributed is already initialised. The op only serves
    ``inference_all_reduce``; training collectives go through torch.distributed/gloo either way.
    ``__compatible_ops__`` is a module-level dict DeepSpeed caches on first access and documents as
    editable, so marking the op incompatible is the supported way to get the non-Linux fallback.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _param_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in module.named_parameters()}


def run_deepspeed_rank(rank: int, world_size: int, case: Case, engine_factory: Callable | None = None) -> RankResult:
    """Inside a spawned rank: ``deepspeed.initialize`` + ``case.steps`` x ``train_batch`` (+ ``eval_batch``).

    ``engine_factory(model, config) -> engine`` replaces ``deepspeed.initialize`` (to test another engine
    on the same model/config/data); it must be a module-level function so the case stays picklable.
    """
    return run_deepspeed_cases(rank, world_size, [case], engine_factory)[0]


def run_deepspeed_cases(rank: int, world_size: int, cases: Sequence[Case],
                        engine_factory: Callable | None = None) -> list[RankResult]:
    """:func:`run_deepspeed_rank` for several cases one after the other in the same processes (one spawn).

    A case with ``plugin`` runs with ``dualpipe_plugin.deepspeed`` registered, one without it with
    DeepSpeed's own ``PipelineEngine`` (the plugin is unregistered for it).
    """
    for case in cases:
        if world_size != case.world_size:
            raise ValueError(f"case needs {case.world_size} ranks (num_stages x dp), got {world_size}")
    if not all(case.keep_shm_comm for case in cases):
        skip_shm_comm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for case in cases:
        if case.plugin:
            import dualpipe_plugin.deepspeed as plugin  # registers DualPipeEngine with deepspeed.initialize

            plugin.register()
        elif "dualpipe_plugin.deepspeed" in sys.modules:
            sys.modules["dualpipe_plugin.deepspeed"].unregister()
        results.append(_run_case(rank, case, engine_factory))
    return results


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 2)


def client_optimizer(case: Case, model) -> dict[str, Any]:
    """The ``deepspeed.initialize`` arguments a DeepSpeed script passes besides model and config (see
    ``Case.client``): two parameter groups (weight decay on matrices, none on biases), as a pre-built torch
    AdamW with a LambdaLR warm-up bound to it, as ``model_parameters`` for the config's optimizer, or with
    an optimizer callable and a scheduler callable.

    ``"layerwise"`` scales the decay group's lr by the building rank's stage (1x, 2x, ...): a layer keeps
    the lr of the stage DeepSpeed's own partition puts it on, wherever a schedule moves it.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    scale = 1 + model.stage_id if case.client == "layerwise" else 1
    groups = [{"params": decay, "weight_decay": 0.1, "lr": case.lr * scale}, {"params": no_decay, "weight_decay": 0.0}]
    if case.client == "groups":
        return {"model_parameters": groups}
    if case.client == "callable":
        return {"model_parameters": groups,
                "optimizer": partial(torch.optim.AdamW, lr=case.lr, foreach=False),
                "lr_scheduler": partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=_warmup)}
    optimizer = torch.optim.AdamW(groups, lr=case.lr, foreach=False)
    return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)}


def _run_case(rank: int, case: Case, engine_factory: Callable | None) -> RankResult:
    import deepspeed

    model = build_pipeline_module(case)
    for name, param in model.named_parameters():
        if name in case.frozen:
            param.requires_grad_(False)
    config = ds_config(case)
    if case.client:
        arguments = client_optimizer(case, model)
        engine, _, _, scheduler = deepspeed.initialize(model=model, config=config, **arguments)
        if isinstance(arguments.get("optimizer"), torch.optim.Optimizer):  # the script's objects, followed
            assert scheduler is arguments["lr_scheduler"] and engine.basic_optimizer is arguments["optimizer"]
        assert scheduler is not None
    elif engine_factory is None:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
        )
    else:
        engine = engine_factory(model, config)
    stage_id = engine.grid.get_stage_id()
    dp_id = engine.grid.get_data_parallel_id()

    losses = []
    for step in range(case.steps):
        loss = engine.train_batch(data_iter(case, step, dp_id))
        losses.append(float(loss.item()))
    eval_loss = None
    if case.eval_after:
        eval_loss = float(engine.eval_batch(data_iter(case, case.steps, dp_id, split="eval")).item())
    extras = dict(getattr(engine, "harness_extras", {}))
    extras["group_lrs"] = [group["lr"] for group in engine.optimizer.param_groups]
    extras["matmul_dtypes"] = sorted({str(m.matmul_dtype) for m in engine.module.modules() if hasattr(m, "matmul_dtype")})
    extras["frozen"] = sorted(name for name, p in engine.module.named_parameters() if not p.requires_grad)
    name = type(engine).__name__
    if hasattr(engine, "pipeline_schedule"):
        name += f":{engine.pipeline_schedule}"
        if engine.pipeline_executor is not None and engine.pipeline_executor.overlap is not None:
            name += "+overlap"
    return RankResult(rank, stage_id, dp_id, losses, _param_snapshot(engine.module), eval_loss, extras, name)


def initialize_pipeline_engine(engine_cls: type, model, config: dict[str, Any]):
    """``deepspeed.initialize``'s pipeline branch with ``engine_cls`` in place of ``PipelineEngine``.

    deepspeed.initialize (0.19.8) hard-codes ``DualPipeVEngine if isinstance(model, DualPipeVModule) else
    PipelineEngine``; nothing registers another class. These are the same steps, minus what a pipeline
    never uses (mesh device, AutoTP merge), so an engine subclass is built without patching DeepSpeed.
    Use as ``engine_factory=functools.partial(initialize_pipeline_engine, MyEngine)``.
    """
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime import zero
    from deepspeed.runtime.config import DeepSpeedConfig

    dist.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    zero.partition_parameters.shutdown_init_context()
    try:
        mpu = model.mpu()
        config_class = DeepSpeedConfig(config, mpu)
        deepspeed.set_optimizer_flags(config_class, model)
        engine = engine_cls(
            args=None, model=model, optimizer=None,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            training_data=None, lr_scheduler=None, mpu=mpu, dist_init_required=None, collate_fn=None,
            config=config, config_class=config_class,
        )
    finally:
        zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine


def merge_rank_params(results: Sequence[RankResult], dp_id: int = 0) -> dict[str, torch.Tensor]:
    """One replica's parameters by global name; a tied weight held by several stages must agree bitwise."""
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        if result.dp_id != dp_id:
            continue
        for name, value in result.params.items():
            if name in merged and not torch.equal(merged[name], value):
                raise AssertionError(f"stages disagree on {name} (max diff {(merged[name] - value).abs().max()})")
            merged[name] = value
    return merged


def params_max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference per parameter; raises if the names differ."""
    if a.keys() != b.keys():
        raise AssertionError(f"parameter names differ: only left {sorted(a.keys() - b.keys())}, "
                             f"only right {sorted(b.keys() - a.keys())}")
    return {name: float((a[name] - b[name]).abs().max()) for name in a}


def launch_case(case: Case, engine_factory: Callable | None = None) -> list[RankResult]:
    """``case`` on its own spawned gloo world: one :class:`RankResult` per rank."""
    return run_local(run_deepspeed_rank, case.world_size, args=(case, engine_factory), timeout_s=240)


def assert_bit_exact(results: Sequence[RankResult], ref: RunResult) -> None:
    """Every rank's losses (and eval loss) and every replica's parameters equal the reference bit for bit."""
    for result in results:
        assert result.losses == ref.losses, f"rank {result.rank}: {result.losses} != {ref.losses}"
        if ref.eval_loss is not None:
            assert result.eval_loss == ref.eval_loss, f"rank {result.rank}: eval {result.eval_loss} != {ref.eval_loss}"
    for dp_id in {r.dp_id for r in results}:
        merged = merge_rank_params(results, dp_id)  # also: every copy of a parameter agrees bitwise
        diffs = params_max_diff(merged, ref.params)
        assert all(torch.equal(merged[n], ref.params[n]) for n in merged), f"dp {dp_id}: {diffs}"


# --- the single-process reference -------------------------------------------------------------------


class _ReferenceModel:
    """The full spec list in one process. Tied uses on different stages get one copy per stage."""

    def __init__(self, case: Case):
        bounds = stage_bounds(case)
        self.stage_of = [next(s for s in range(case.num_stages) if bounds[s] <= i < bounds[s + 1])
                         for i in range(bounds[-1])]
        tied_stages = sorted({self.stage_of[i] for i, spec in enumerate(layer_specs(case)) if _is_tied(spec)})
        self.split_tied = len(tied_stages) > 1
        self.tied_copies: dict[int, nn.Module] = {}  # owning stage (0 when not split) -> module
        self.layers: dict[int, nn.Module] = {}
        self.funcs: list[Callable] = []
        for i, spec in enumerate(layer_specs(case)):
            if _is_tied(spec):
                owner = self.stage_of[i] if self.split_tied else 0
                if owner not in self.tied_copies:
                    self.tied_copies[owner] = spec.build()
                module = self.tied_copies[owner]
                self.funcs.append(module if spec.forward_fn is None else partial(spec.forward_fn, module))
            else:
                self.layers[i] = spec.build()
                self.funcs.append(self.layers[i])
        self.tied_stages = tied_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for func in self.funcs:
            x = func(x)
        return x

    def named_params(self) -> dict[str, nn.Parameter]:
        """Global name -> parameter; the first tied copy stands for the tied weight."""
        named = {}
        if self.tied_copies:
            first = self.tied_copies[min(self.tied_copies)]
            named.update({f"tied_modules.{TIED_KEY}.{n}": p for n, p in first.named_parameters()})
        for i, module in self.layers.items():
            named.update({f"{i}.{n}": p for n, p in module.named_parameters()})
        return named

    def all_params(self) -> list[nn.Parameter]:
        params = [p for m in self.tied_copies.values() for p in m.parameters()]
        return params + [p for m in self.layers.values() for p in m.parameters()]

    def stage0_params(self) -> list[nn.Parameter]:
        """DeepSpeed's ``module.parameters()`` order on stage 0: tied modules first, then layers."""
        params = [p for p in self.tied_copies.get(0, nn.Module()).parameters()] if self.tied_copies else []
        return params + [p for i, m in self.layers.items() if self.stage_of[i] == 0 for p in m.parameters()]


def _is_tied(spec) -> bool:
    from deepspeed.pipe import TiedLayerSpec

    return isinstance(spec, TiedLayerSpec)


def _clip_stage0_(model: _ReferenceModel, grads: dict[int, torch.Tensor], max_norm: float) -> None:
    """DeepSpeed's fp32 ``clip_grad_norm_`` with a pipeline grid: the norm counts stage-0 parameters only."""
    norms = [grads[id(p)].float().norm(2) for p in model.stage0_params()]
    total = torch.stack(norms).pow(2.0).sum().float() if norms else torch.tensor([0.0])
    total = total.pow(1.0 / 2.0)
    # clip_grad_norm_ then averages the norm over the data-parallel group: (n / dp) * dp is exact for dp <= 2
    coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total + 1e-6))
    for grad in grads.values():
        grad.mul_(coef)


def _clip_global_(model: _ReferenceModel, grads: dict[int, torch.Tensor], max_norm: float) -> None:
    unique = [grads[id(p)] for p in model.named_params().values()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unique]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for grad in grads.values():
        grad.mul_(coef)


def reference_run(case: Case, *, global_clip: bool = False) -> RunResult:
    """Train ``case`` unpipelined in this process with DeepSpeed's arithmetic (see the module note).

    fp32 SGD/Adam with ZeRO 0/1 and dp <= 2 reproduces DeepSpeed bit for bit; with clipping under ZeRO-1
    or bf16 the norm differs in rounding (see the tests for tolerances); bf16 is not modelled (the
    reference stays fp32). ``global_clip`` clips fp32 ZeRO-0 with the global norm too (our engines' rule).
    """
    if case.dp > 2:
        raise ValueError(f"the reference sums replicas in one fixed order; dp={case.dp} > 2 is not bit-exact")
    with one_thread():
        model = _ReferenceModel(case)
        params = model.all_params()
        if case.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=case.lr)
        else:
            optimizer = torch.optim.Adam(params, lr=case.lr, foreach=False)
        losses = []
        for step in range(case.steps):
            summed: dict[int, torch.Tensor] = {}
            replica_losses = []
            for dp_id in range(case.dp):
                for p in params:
                    p.grad = None
                total = None
                for x, y in micro_batches_for(case, step, dp_id):
                    loss = mse_loss(model.forward(x.float()), y)
                    total = torch.zeros_like(loss) if total is None else total
                    total += loss.detach()
                    (loss / case.micro_batches).backward()
                replica_losses.append(total / case.micro_batches)
                grads = {id(p): p.grad.clone() for p in params}
                if model.split_tied:  # ReduceTiedGrads: one all-reduce over the stages holding a copy
                    copies = [model.tied_copies[s] for s in model.tied_stages]
                    for named in zip(*(c.parameters() for c in copies)):
                        reduced = sum((grads[id(p)] for p in named[1:]), grads[id(named[0])].clone())
                        for p in named:
                            grads[id(p)] = reduced.clone()
                for key, grad in grads.items():  # ReduceGrads: all-reduce over replicas
                    summed[key] = grad if key not in summed else summed[key] + grad
            if case.dp > 1:
                for grad in summed.values():
                    grad.mul_(1.0 / case.dp)
            if case.gradient_clipping > 0:
                if case.zero_stage == 0 and not case.bf16 and not global_clip:
                    _clip_stage0_(model, summed, case.gradient_clipping)
                else:
                    _clip_global_(model, summed, case.gradient_clipping)
            for p in params:
                p.grad = summed[id(p)]
            optimizer.step()
            loss = replica_losses[0]
            if case.dp > 1:
                loss = (replica_losses[0] + replica_losses[1]) / case.dp
            losses.append(float(loss.item()))
        eval_loss = None
        if case.eval_after:
            with torch.no_grad():
                replica = []
                for dp_id in range(case.dp):
                    total = sum(mse_loss(model.forward(x.float()), y)
                                for x, y in micro_batches_for(case, case.steps, dp_id, split="eval"))
                    replica.append(total / case.micro_batches)
                eval_loss = float((sum(replica) / case.dp).item())
        final = {name: p.detach().clone() for name, p in model.named_params().items()}
    return RunResult(losses, final, eval_loss)



# --- checkpoints -----------------------------------------------------------------------------------------


def _build_engine(case: Case, *, stock: bool = False):
    """``deepspeed.initialize`` on ``case`` (or, with ``stock``, DeepSpeed's own PipelineEngine on it)."""
    import deepspeed
    from deepspeed.runtime.pipe.engine import PipelineEngine

    model = build_pipeline_module(case)
    if stock:
        return initialize_pipeline_engine(PipelineEngine, model, ds_config(replace(case, pipeline={})))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config(case)
    )
    return engine


def run_checkpoint_rank(rank: int, world_size: int, case: Case, directory: str, phase: str) -> dict:
    """Checkpoint round trips inside a spawned rank; ``phase`` is ``"save"`` or then ``"resume"``.

    save:   train 2 steps, ``save_checkpoint(tag="ours")``, train 1 more (the uninterrupted run); then load
            the module files into DeepSpeed's own engine (TrainSchedule placement) and save them as
            ``tag="stock"`` from there.
    resume: a fresh engine (new processes) loads ``"stock"`` module-only (DeepSpeed's files into our
            placement), then ``"ours"`` in full, and trains the third step again.
    Returns losses and parameter snapshots by global name (this rank's).
    """
    if not case.keep_shm_comm:
        skip_shm_comm_build()
    import deepspeed

    if case.plugin:
        import dualpipe_plugin.deepspeed  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    engine = _build_engine(case)
    dp_id = engine.grid.get_data_parallel_id()
    out: dict[str, Any] = {"rank": rank, "dp_id": dp_id}
    if phase == "save":
        out["losses"] = [float(engine.train_batch(data_iter(case, step, dp_id)).item()) for step in range(2)]
        out["saved"] = _param_snapshot(engine.module)
        engine.save_checkpoint(directory, tag="ours")
        out["losses"].append(float(engine.train_batch(data_iter(case, 2, dp_id)).item()))
        out["final"] = _param_snapshot(engine.module)
        stock = _build_engine(case, stock=True)
        stock.load_checkpoint(directory, tag="ours", load_module_only=True, load_optimizer_states=False,
                              load_lr_scheduler_states=False)
        out["stock_loaded"] = _param_snapshot(stock.module)
        stock.save_checkpoint(directory, tag="stock")
    elif phase == "resume":
        engine.load_checkpoint(directory, tag="stock", load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        out["from_stock"] = _param_snapshot(engine.module)
        engine.load_checkpoint(directory, tag="ours")
        out["loaded"] = _param_snapshot(engine.module)
        out["losses"] = [float(engine.train_batch(data_iter(case, 2, dp_id)).item())]
        out["final"] = _param_snapshot(engine.module)
        out["global_steps"] = engine.global_steps
    else:
        raise ValueError(f"phase must be 'save' or 'resume', got {phase!r}")
    return out


# --- bad input and the shipped configs -------------------------------------------------------------------


def _initialize_error(build: Callable[[], Any]) -> tuple[str, str, bool] | None:
    """``(error type, message)`` of what ``build()`` raised, or None if it built an engine."""
    try:
        build()
    except Exception as error:  # noqa: BLE001 - the test inspects the type
        return type(error).__name__, str(error), isinstance(error, ValueError)
    return None


def assert_refused_on_every_rank(errors: list[dict], expected: dict[str, str], *, one_line: bool = False) -> None:
    """Every rank's ``name -> _initialize_error`` result is a DeepSpeedPipelineConfigError (a ValueError) whose
    message matches ``expected[name]`` (a regex; one line when ``one_line``), the same on every rank."""
    for rank_errors in errors:
        for name, pattern in expected.items():
            assert rank_errors[name] is not None, f"{name}: no error"
            kind, message, is_value_error = rank_errors[name]
            assert (kind, is_value_error) == ("DeepSpeedPipelineConfigError", True), (name, kind, message)
            assert re.search(pattern, message), (name, message)
            assert not one_line or "\n" not in message, (name, message)
    assert all(rank_errors == errors[0] for rank_errors in errors), "every rank raises the same error"


def run_bad_input_rank(rank: int, world_size: int) -> dict[str, tuple | None]:
    """Each bad configuration through ``deepspeed.initialize`` on 2 ranks; returns name -> (type, message, is ValueError).

    Also ``eval_batch`` with too few micro-batches on a good engine: it must fail before touching the data
    iterators (the engine's training iterator is checked afterwards: ``"eval_kept_iterator"``).
    """
    skip_shm_comm_build()
    import deepspeed
    import dualpipe_plugin.deepspeed  # noqa: F401
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from dualpipe_plugin.deepspeed import DualPipeEngine

    deepspeed.init_distributed(dist_backend="gloo")
    base = Case(num_stages=2, plugin=True, pipeline={"schedule": "dualpipev"})

    def init(case: Case, model=None, **kwargs):
        model = build_pipeline_module(case) if model is None else model
        kwargs.setdefault("model_parameters", [p for p in model.parameters() if p.requires_grad])
        return deepspeed.initialize(model=model, config=ds_config(case), **kwargs)

    def with_schedule(schedule: str, **changes) -> Case:
        return replace(base, pipeline={"schedule": schedule}, **changes)

    errors: dict[str, Any] = {}
    errors["unknown_schedule"] = _initialize_error(lambda: init(with_schedule("dualpipe-x")))
    errors["dualpipe_odd_stages"] = _initialize_error(lambda: init(with_schedule("dualpipe", num_stages=1, dp=2)))
    errors["too_few_microbatches"] = _initialize_error(lambda: init(with_schedule("dualpipev", micro_batches=3)))
    errors["dualpipe_odd_microbatches"] = _initialize_error(lambda: init(with_schedule("dualpipe", micro_batches=5)))
    errors["zero2"] = _initialize_error(lambda: init(with_schedule("dualpipev", zero_stage=2)))
    errors["dynamic_shape"] = _initialize_error(
        lambda: init(base, model=build_pipeline_module(base, dynamic_shape=True)))
    errors["bad_overlap_value"] = _initialize_error(
        lambda: init(replace(base, pipeline={"schedule": "dualpipev", "overlap": "yes"})))

    def tensor_parallel():
        topology = PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=1)
        model = PipelineModule(layers=layer_specs(base), topology=topology, loss_fn=mse_loss,
                               partition_method="uniform")
        return init(with_schedule("dualpipev", num_stages=1, micro_batches=2), model=model)

    errors["tensor_parallel_partitioned"] = _initialize_error(tensor_parallel)

    def dualpipev_module(schedule: str):
        from deepspeed.runtime.pipe.dualpipev import DualPipeVModule

        model = DualPipeVModule(layers=layer_specs(base), num_stages=2, loss_fn=mse_loss, partition_method="uniform")
        return init(with_schedule(schedule), model=model)

    errors["dualpipev_module"] = _initialize_error(lambda: dualpipev_module("dualpipev"))
    errors["dualpipev_module_deepspeed"] = type(dualpipev_module("deepspeed")[0]).__name__
    errors["has_bool_tensors"] = _initialize_error(
        lambda: initialize_pipeline_engine(partial(DualPipeEngine, True), build_pipeline_module(base), ds_config(base)))

    engine, _, _, _ = init(base)
    train_iterator = data_iter(base, 0, 0)
    engine.set_dataiterator(train_iterator)
    errors["eval_too_few_microbatches"] = _initialize_error(
        lambda: engine.eval_batch(data_iter(base, 0, 0, split="eval"), num_micro_batches=2))
    errors["eval_kept_iterator"] = engine.data_iterator is train_iterator if engine.is_first_stage() else True
    return errors


def run_config_file_rank(rank: int, world_size: int, paths: Sequence[str]) -> dict[str, dict]:
    """One ``train_batch`` of a tiny model per shipped JSON config (2 pipeline ranks).

    The configs name ``"AdamW"`` (FusedAdam on GPU); here ``torch_adam`` keeps DeepSpeed from JIT-building
    its CPU Adam. Everything else is used as shipped.
    """
    import json

    skip_shm_comm_build()
    import deepspeed
    import dualpipe_plugin.deepspeed  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for path in paths:
        with open(path) as handle:
            config = json.load(handle)
        config["optimizer"]["params"]["torch_adam"] = True
        micro_batches = config["gradient_accumulation_steps"]
        case = Case(num_stages=world_size, micro_batches=micro_batches,
                    micro_batch_size=config["train_micro_batch_size_per_gpu"],
                    bf16=config.get("bf16", {}).get("enabled", False))
        model = build_pipeline_module(case)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        loss = engine.train_batch(data_iter(case, 0, 0))
        out[path] = {
            "loss": float(loss.item()),
            "schedule": engine.pipeline_schedule,
            "optimizer": type(engine.optimizer).__name__,
            "params_finite": all(torch.isfinite(p).all().item() for p in engine.module.parameters()),
        }
    return out


def run_optimizer_refusal_rank(rank: int, world_size: int) -> dict[str, tuple | None]:
    """Pre-built optimizers that cannot follow dualpipev's rebuilt layers, each through ``deepspeed.initialize``
    on 2 ranks; returns name -> (error type, message, is ValueError) on this rank."""
    skip_shm_comm_build()
    import deepspeed
    import dualpipe_plugin.deepspeed  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    case = Case(num_stages=2, plugin=True, pipeline={"schedule": "dualpipev"}, client="adamw")

    def init(model, optimizer, **kwargs):
        return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(case), **kwargs)

    def stepped():
        model = build_pipeline_module(case)
        optimizer = client_optimizer(case, model)["optimizer"]
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        optimizer.step()
        return init(model, optimizer)

    def lbfgs():
        model = build_pipeline_module(case)
        return init(model, torch.optim.LBFGS(model.parameters()))

    def foreign():
        model = build_pipeline_module(case)
        optimizer = client_optimizer(case, model)["optimizer"]
        if model.stage_id == 0:
            optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
        return init(model, optimizer)

    def tied_conflict():
        model = build_pipeline_module(replace(case, tied=True))
        first, second = [], []
        for name, param in model.named_parameters():
            tied_first = name.startswith("tied_modules") and model.stage_id == 0
            (first if tied_first or (param.ndim >= 2 and not name.startswith("tied_modules")) else second).append(param)
        optimizer = torch.optim.AdamW([{"params": first}, {"params": second, "weight_decay": 0.0}], lr=0.01)
        return init(model, optimizer)

    def scheduler_missing_group():  # rank 0 built one group, rank 1 two: rank 0's scheduler has one entry
        model = build_pipeline_module(case)
        params = list(model.parameters())
        if model.stage_id == 0:
            optimizer = torch.optim.AdamW(params, lr=0.01)
        else:
            optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},
                                           {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return init(model, optimizer, lr_scheduler=scheduler)

    def mixed_model_parameters():
        model = build_pipeline_module(case)
        params = list(model.parameters())
        return deepspeed.initialize(model=model, model_parameters=[{"params": params[:1]}, *params[1:]],
                                    config=ds_config(replace(case, client="")))

    return {name: _initialize_error(build) for name, build in [
        ("stepped", stepped), ("lbfgs", lbfgs), ("foreign", foreign), ("tied_conflict", tied_conflict),
        ("mixed_model_parameters", mixed_model_parameters), ("scheduler_missing_group", scheduler_missing_group)]}


def run_forward_refusal_rank(rank: int, world_size: int) -> dict[str, Any]:
    """What a schedule's chunks cannot honour of DeepSpeed's forward, each refused (2 ranks, dualpipev);
    returns name -> (error type, message, is ValueError)."""
    skip_shm_comm_build()
    import deepspeed
    import dualpipe_plugin.deepspeed  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    base = Case(num_stages=2, plugin=True, pipeline={"schedule": "dualpipev"})
    staged = replace(base, staged=True, pipeline={"schedule": "dualpipev", "overlap": True})

    def init(case: Case, model=None, config=None):
        model = build_pipeline_module(case) if model is None else model
        return deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                    config=config or ds_config(case))[0]

    def adapter_injected():  # a layer changed after the PipelineModule was built: the rebuild would drop it
        model = build_pipeline_module(base)
        if model.stage_id == 1:
            model._modules["5"].linear = LowRankAdapted(model._modules["5"].linear, rank=2)
        return init(base, model)

    def user_hook_with_overlap():
        engine = init(staged)
        engine.module.register_forward_hook(lambda module, inputs, output: None)
        return engine.train_batch(data_iter(staged, 0, 0))

    return {
        "autocast_with_overlap": _initialize_error(lambda: init(replace(staged, autocast=True))),
        "autotuning": _initialize_error(lambda: init(base, config={**ds_config(base), "autotuning": {"enabled": True}})),
        "compile": _initialize_error(lambda: init(base).compile()),
        "adapter_injected": _initialize_error(adapter_injected),
        "user_hook_with_overlap": _initialize_error(user_hook_with_overlap),
    }


# --- checkpoints across schedules --------------------------------------------------------------------------


@dataclass(frozen=True)
class Leg:
    """One stretch of a training run: an engine for ``case`` (its schedule, optimizer, ...), optionally loading
    checkpoint ``load`` first, training ``steps`` (data by step index), optionally saving ``save`` after."""

    case: Case
    steps: tuple[int, ...] = ()
    load: str | None = None
    module_only: bool = False
    save: str | None = None
    damage_record: bool = False
    """Before loading, global rank 0 overwrites the checkpoint's dualpipe_placement.json with broken JSON."""
    optimizer_snapshot: bool = False
    """Report the optimizer state (full tensors by global name) after loading (if it loads) and after training."""


def _optimizer_snapshot(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full optimizer state and fp32 master by GLOBAL name (a collective over data parallel)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from dualpipe_plugin.deepspeed.placement_record import ExpertNames

    names = ExpertNames.of_module(engine.module)
    flat = not isinstance(engine.optimizer, torch.optim.Optimizer)
    out = {}
    for name, param in engine.module.named_parameters():
        if flat:
            entry = {key: safe_get_full_optimizer_state(param, key).clone() for key in ("exp_avg", "exp_avg_sq")}
            entry["fp32"] = safe_get_full_fp32_param(param).clone()
        else:
            entry = {k: v.clone() for k, v in engine.optimizer.state[param].items() if torch.is_tensor(v)}
        out[names.to_global(name)] = entry
    return out


def _engine_for(case: Case):
    import deepspeed

    if case.plugin:
        import dualpipe_plugin.deepspeed as plugin

        plugin.register()
    elif "dualpipe_plugin.deepspeed" in sys.modules:
        sys.modules["dualpipe_plugin.deepspeed"].unregister()
    model = build_pipeline_module(case)
    if case.client:
        return deepspeed.initialize(model=model, config=ds_config(case), **client_optimizer(case, model))[0]
    return deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                config=ds_config(case))[0]


def run_legs_rank(rank: int, world_size: int, legs: Sequence[Leg], directory: str) -> list[dict]:
    """The legs one after the other in these processes, each with a fresh engine; per leg: the engine's name,
    its losses, the parameters right after loading and after training (this rank's, by global name), the
    step counter, and the refusal if loading raised (the leg then stops there)."""
    skip_shm_comm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for leg in legs:
        try:
            engine = _engine_for(leg.case)
        except ValueError as error:  # refused at initialize (the test inspects it)
            out.append({"engine": "", "error": (type(error).__name__, str(error), True), "at": "initialize"})
            continue
        dp_id = engine.grid.get_data_parallel_id()
        report: dict[str, Any] = {"engine": f"{type(engine).__name__}:{getattr(engine, 'pipeline_schedule', '')}",
                                  "stage_id": engine.stage_id, "dp_id": dp_id, "error": None}
        if leg.damage_record:
            if torch.distributed.get_rank() == 0:
                with open(f"{directory}/{leg.load}/dualpipe_placement.json", "w") as handle:
                    handle.write("{")
            torch.distributed.barrier()
        if leg.load is not None:
            try:
                engine.load_checkpoint(directory, tag=leg.load, load_module_only=leg.module_only)
            except Exception as error:  # noqa: BLE001 - the test inspects it
                report["error"] = (type(error).__name__, str(error), isinstance(error, ValueError))
                out.append(report)
                continue
        report["loaded"] = _param_snapshot(engine.module)
        report["global_steps"] = engine.global_steps
        if leg.optimizer_snapshot and leg.load is not None:  # a fresh optimizer has no state to snapshot yet
            report["loaded_optimizer"] = _optimizer_snapshot(engine)
        report["losses"] = [float(engine.train_batch(data_iter(leg.case, step, dp_id)).item()) for step in leg.steps]
        report["params"] = _param_snapshot(engine.module)
        if leg.optimizer_snapshot:
            report["optimizer"] = _optimizer_snapshot(engine)
        if leg.save is not None:
            engine.save_checkpoint(directory, tag=leg.save)
        out.append(report)
    return out
