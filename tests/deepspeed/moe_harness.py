"""A DeepSpeed MoE model written the way a DeepSpeed user writes one, and spawned-rank bodies for
test_moe_overlap.py.

``InputLayer`` projects the data, each :class:`MoEBlock` is a transformer-like block whose MLP is
``deepspeed.moe.layer.MoE``, ``Head`` projects back; the loss is an MSE. The gate's aux loss is trained,
carried one of two ways (``MoECase.carry``):

* ``"tuple"``: the layers pass ``(hidden, aux)`` and the loss adds ``AUX_COEF`` times the aux sum;
* ``"inject"``: the layers pass ``hidden`` alone and each block hands ``AUX_COEF * l_aux`` its gradient
  directly in backward (:class:`AuxLossInjection`, what Megatron-Core's ``MoEAuxLossAutoScaler`` does).

DeepSpeed's TrainSchedule back-propagates each floating-point output of a stage with its own
``backward`` call, so with ``"tuple"`` the parameters upstream of both outputs accumulate their two
contributions one at a time; our executor (any schedule, overlap or not) back-propagates a stage's
outputs in one call. Both are exact math; the sums round differently (one fp32 ulp).

Every parameter is initialised from its own seed (experts: from their GLOBAL expert index, so the two
expert-parallel ranks hold different experts), so DeepSpeed's TrainSchedule, our engine and the
single-block checks all start from the same weights. Routing draws no random numbers (no RTS, no noisy
gate, no second-expert sampling), so the routing is a function of the activations alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tests.deepspeed.harness import skip_shm_comm_build

__all__ = ["AUX_COEF", "Expert", "Head", "InputLayer", "MoEBlock", "MoECase", "moe_loss", "run_block_checks",
           "run_engine_cases"]

AUX_COEF = 0.01
HIDDEN = 16


def _init(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.empty(param.shape).uniform_(-0.4, 0.4, generator=generator))


class Expert(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Twice(torch.autograd.Function):
    """A user's custom autograd Function (the ``function`` variant applies it to a tensor from before the MoE)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _ep_rank(ep_size: int) -> int:
    """The expert-parallel rank: DeepSpeed's data-parallel index (topology axes pipe x data)."""
    return torch.distributed.get_rank() % ep_size


def _moe(seed: int, *, num_experts: int, ep_size: int, k: int, use_residual: bool = False):
    from deepspeed.moe.layer import MoE

    moe = MoE(HIDDEN, Expert(HIDDEN), num_experts=num_experts, ep_size=ep_size, k=k, capacity_factor=1.0,
              eval_capacity_factor=1.0, min_capacity=0, use_residual=use_residual, use_rts=False,
              top2_2nd_expert_sampling=False)
    _init(moe.deepspeed_moe.gate, seed)
    local = moe.num_local_experts
    for index, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        _init(expert, seed * 100 + _ep_rank(ep_size) * local + index + 1)
    if use_residual:
        _init(moe.mlp, seed * 100 + 99)
        _init(moe.coefficient, seed * 100 + 98)
    return moe


class AuxLossInjection(torch.autograd.Function):
    """Identity on ``output``; in backward, ``aux_loss`` gets the gradient 1 (as if added to the loss)."""

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.ones_like(aux_loss)


class InputLayer(nn.Module):
    def __init__(self, seed: int, carry: str = "tuple"):
        super().__init__()
        self.carry = carry
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        _init(self, seed)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        return (h, torch.zeros((), dtype=x.dtype, device=x.device)) if self.carry == "tuple" else h


class MoEBlock(nn.Module):
    """A transformer-like block around DeepSpeed's MoE layer, as a user writes it (``variant``):

    * ``plain``: ``h = x + attn(norm(x)); y = moe(norm2(h)); return h + y, aux + l_aux``
    * ``residual``: the same with DeepSpeed's residual MoE (``use_residual=True``: MoE.forward then runs
      its dense MLP and coefficient on the MoE input, a tensor from before the all-to-alls)
    * ``two``: two MoE layers one after the other in one block
    * ``inplace`` / ``twice`` / ``function`` / ``unused``: bad inputs (``out += y`` on a tensor from before
      the MoE; the same MoE layer called twice; a custom autograd Function applied to a tensor from before
      the MoE; the MoE layer not called)
    """

    def __init__(self, seed: int, num_experts: int = 4, ep_size: int = 2, k: int = 2, variant: str = "plain",
                 carry: str = "tuple"):
        super().__init__()
        self.variant, self.carry = variant, carry
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn = nn.Linear(HIDDEN, HIDDEN)
        self.norm2 = nn.LayerNorm(HIDDEN)
        _init(self, seed)
        self.moe = _moe(seed, num_experts=num_experts, ep_size=ep_size, k=k, use_residual=variant == "residual")
        if variant == "two":
            self.norm3 = nn.LayerNorm(HIDDEN)
            _init(self.norm3, seed + 500)
            self.moe2 = _moe(seed + 1000, num_experts=num_experts, ep_size=ep_size, k=1)

    def forward(self, inputs):
        if self.carry == "inject":
            h = inputs + torch.tanh(self.attn(self.norm1(inputs)))
            y, l_aux, _ = self.moe(self.norm2(h))
            return AuxLossInjection.apply(h + y, AUX_COEF * l_aux)
        x, aux = inputs
        h = x + torch.tanh(self.attn(self.norm1(x)))
        if self.variant == "unused":  # holds an MoE layer, does not call it
            return h, aux + 0.0 * h.mean()
        if self.variant == "inplace":
            out = h + 0.0
            y, l_aux, _ = self.moe(self.norm2(h))
            out += y  # fine for autograd (the add saves nothing), but modifies a tensor from before the MoE
            return out, aux + l_aux
        y, l_aux, _ = self.moe(self.norm2(h))
        if self.variant == "function":
            return _Twice.apply(h) + y, aux + l_aux
        if self.variant == "twice":
            y2, l_aux2, _ = self.moe(self.norm2(h + y))
            return h + y2, aux + l_aux + l_aux2
        h = h + y
        aux = aux + l_aux
        if self.variant == "two":
            y, l_aux, _ = self.moe2(self.norm3(h))
            h, aux = h + y, aux + l_aux
        return h, aux


class Head(nn.Module):
    def __init__(self, seed: int, carry: str = "tuple"):
        super().__init__()
        self.carry = carry
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        _init(self, seed)

    def forward(self, inputs):
        if self.carry == "inject":
            return self.proj(inputs)
        h, aux = inputs
        return self.proj(h), aux


def moe_loss(outputs, labels):
    if isinstance(outputs, torch.Tensor):
        return F.mse_loss(outputs, labels)
    out, aux = outputs
    return F.mse_loss(out, labels) + AUX_COEF * aux


# --- the pipeline engine runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class MoECase:
    num_blocks: int = 4
    num_stages: int = 2
    ep: int = 2
    micro_batches: int = 4
    micro_batch: int = 2
    seq: int = 4
    steps: int = 2
    k: int = 2
    carry: str = "tuple"
    """How the aux loss reaches the loss: ``"tuple"`` or ``"inject"`` (module docstring)."""
    plugin: bool = False
    pipeline: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.num_stages * self.ep


def _specs(case: MoECase) -> list:
    from deepspeed.pipe import LayerSpec

    carry = case.carry
    return ([LayerSpec(InputLayer, 1, carry=carry)]
            + [LayerSpec(MoEBlock, 10 * (i + 1), ep_size=case.ep, k=case.k, carry=carry)
               for i in range(case.num_blocks)]
            + [LayerSpec(Head, 2, carry=carry)])


def _batches(case: MoECase, step: int, dp_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 * step + dp_id)
    shape = (case.micro_batch, case.seq, HIDDEN)
    return [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
            for _ in range(case.micro_batches)]


def _run_engine(case: MoECase) -> dict:
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    import dualpipe_plugin.deepspeed as plugin
    from dualpipe_plugin.deepspeed.moe_overlap import DeepSpeedMoEStages

    (plugin.register if case.plugin else plugin.unregister)()
    topology = PipeDataParallelTopology(num_pp=case.num_stages, num_dp=case.ep)
    model = PipelineModule(layers=_specs(case), topology=topology, loss_fn=moe_loss, partition_method="uniform")
    config = {
        "train_micro_batch_size_per_gpu": case.micro_batch,
        "gradient_accumulation_steps": case.micro_batches,
        "train_batch_size": case.micro_batch * case.micro_batches * case.ep,
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True, "adam_w_mode": False}},
        "gradient_clipping": 0.0,  # DeepSpeed's default clips, with another norm rule than ours (see the README)
        "steps_per_print": 10**9,
    }
    if case.pipeline:
        config["pipeline"] = dict(case.pipeline)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dp_id = engine.grid.get_data_parallel_id()
    trace = None
    executor = getattr(engine, "pipeline_executor", None)
    if executor is not None and executor.overlap is not None:
        trace = executor.overlap.trace = []
    losses = [float(engine.train_batch(iter(_batches(case, step, dp_id))).item()) for step in range(case.steps)]
    staged = 0
    if executor is not None:
        staged = sum(isinstance(m, DeepSpeedMoEStages) for chunk in executor.chunks for m in chunk.modules())
    pairs_overlapped = _overlapped_pairs(trace) if trace is not None else 0
    params = {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}
    return {"losses": losses, "params": params, "dp_id": dp_id, "stage_id": engine.stage_id,
            "staged_blocks": staged, "pairs_overlapped": pairs_overlapped}


def _overlapped_pairs(trace) -> int:
    """All-to-alls of one side that were in flight while the other side computed (the trace's events)."""
    return sum(
        any(e.what == "compute" and e.side[0] != comm.side[0] and comm.start <= e.start and e.end <= comm.end
            for e in trace)
        for comm in trace if comm.what == "comm"
    )


def run_engine_cases(rank: int, world_size: int, cases: list[MoECase]) -> list[dict]:
    skip_shm_comm_build()
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    return [_run_engine(case) for case in cases]


# --- single blocks: plain against staged, sequential and inside an overlapped pair ------------------------


def _block_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + torch.distributed.get_rank())
    x = torch.randn(2, 4, HIDDEN, generator=generator)
    return x, torch.zeros(())


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _plain(block: nn.Module, x, aux, grad_out):
    leaf = x.clone().requires_grad_()
    out, total = block((leaf, aux))
    torch.autograd.backward([out, total], [grad_out, torch.ones(())])
    return out.detach(), float(total.detach()), leaf.grad, _grads(block)


def run_block_checks(rank: int, world_size: int, variants: list[str]) -> dict:
    """Per variant: the plain block against DeepSpeedMoEStages in a StagedChunk, (1) one after the other
    (StagedChunk as a module), (2) the staged block's forward overlapped with another staged block's
    backward (the overlap engine's rule) with the W split bound, against the plain block with the same
    split bound (the split's input-gradient matmul rounds differently from autograd's on some
    non-contiguous gradients, whatever the staging). Bad variants report their error instead."""
    skip_shm_comm_build()
    import deepspeed

    from dualpipe_plugin.deepspeed.moe_overlap import DeepSpeedMoEStages
    from dualpipe_plugin.runtime.overlap import Side, run_pair_sides
    from dualpipe_plugin.runtime.staged import StagedChunk, claim_backward
    from dualpipe_plugin.runtime.weight_grad import WeightGradStore, bind_weight_split

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    out: dict = {}
    aux = torch.zeros(())
    grad_out = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(3))
    for variant in variants:
        def build(seed: int, split: bool = False) -> MoEBlock:
            block = MoEBlock(seed, ep_size=world_size, variant=variant)
            for module in block.modules():
                if hasattr(module, "set_deepspeed_parallelism"):
                    module.set_deepspeed_parallelism()
            if split:
                bind_weight_split([block], WeightGradStore())
            return block

        x = _block_inputs(7)[0]
        try:
            reference = _plain(build(10), x, aux, grad_out)
            staged_block = build(10)
            chunk = StagedChunk([DeepSpeedMoEStages(staged_block)])
            leaf = x.clone().requires_grad_()
            got, total = chunk(leaf, aux)
            torch.autograd.backward([got, total], [grad_out, torch.ones(())])
            sequential = (got.detach(), float(total.detach()), leaf.grad, _grads(staged_block))

            # The pair: F of chunk a (block seed 10) while B of chunk b (block seed 20, forwarded before).
            x_b = _block_inputs(8)[0]
            plain_b = _plain(build(20, split=True), x_b, aux, grad_out)
            block_a, block_b = build(10), build(20)
            a, b = StagedChunk([DeepSpeedMoEStages(block_a)]), StagedChunk([DeepSpeedMoEStages(block_b)])
            store = WeightGradStore()
            bind_weight_split([a, b], store)
            x_b = x_b.clone().requires_grad_()
            out_b = b(x_b, aux)
            x_a = x.clone().requires_grad_()
            results = {}
            forward = Side("F", a, lambda: (a.begin((x_a, aux)), (x_a, aux)),
                           lambda run, outs: results.__setitem__("f", run.stitch(outs)))
            backward = Side("B", b, lambda: claim_backward(b, list(out_b), [grad_out, torch.ones(())]),
                            lambda run, grads: run.deposit_input_grads(grads), backward=True, store=store)
            run_pair_sides(forward, backward, overlap=True)
            f_out, f_total = results["f"]
            pair = {"f_out": f_out.detach(), "f_total": float(f_total.detach()), "b_input_grad": x_b.grad,
                    "b_grads": _grads(block_b)}
            out[variant] = {"reference": reference, "sequential": sequential, "pair": pair, "plain_b": plain_b,
                            "error": None}
        except Exception as error:  # noqa: BLE001 - the test reads the bad variants' errors
            out[variant] = {"error": (type(error).__name__, str(error))}
    return out
