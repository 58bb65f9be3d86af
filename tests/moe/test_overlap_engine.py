"""The overlap engine in one process: the interleaving order of the docstring timeline, the W split inside
the pair, gradients equal to the sequential pair, the fallback warning, and a P=1 pipeline end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.moe import MoEConfig, lm_loss, moe_chunks, moe_layers
from dualpipe_plugin.runtime.overlap import OverlapFallbackWarning, Side, overlap_engine_for, run_pair_sides
from dualpipe_plugin.runtime.pipeline import DualPipeline
from dualpipe_plugin.runtime.staged import ComputeStage, StageKind, StagedChunk, claim_backward
from dualpipe_plugin.runtime.weight_grad import WeightGradStore, accumulate_weight_grads


class _LoggedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, layer):
        ctx.save_for_backward(x)
        ctx.weight, ctx.layer = weight, layer
        return x * weight.detach()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        layer, weight = ctx.layer, ctx.weight

        def weight_grads():
            layer.log.append(("weight", layer.name))
            return [(weight, (grad * x).sum().reshape(weight.shape))]

        computed = weight_grads() if layer.store is None else layer.store.defer(weight_grads)
        if computed is not None:
            accumulate_weight_grads(computed)
        return grad * weight.detach(), None, None


class Scale(nn.Module):
    """y = w·x with its weight gradient deferred through the W store (and logged when it runs)."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log
        self.weight = nn.Parameter(torch.tensor(1.5))
        self.store = None

    def bind_weight_grad_store(self, store) -> None:
        self.store = store

    def forward(self, x):
        self.log.append(("compute", self.name))
        return _LoggedWeight.apply(x, self.weight, self)


class _Logged:
    def __init__(self, log, what, value):
        self.log, self.what, self.value = log, what, value

    def wait(self):
        self.log.append(("wait", self.what))
        return self.value


class Swap:
    """A COMM stand-in: negates its input (and its gradient); logs launch and wait."""

    kind = StageKind.COMM

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def forward(self, state, inputs):
        self.log.append(("launch", f"F:{self.name}"))
        return _Logged(self.log, f"F:{self.name}", tuple(-t.detach().requires_grad_(t.requires_grad) for t in inputs))

    def backward(self, state, grads):
        self.log.append(("launch", f"B:{self.name}"))
        return _Logged(self.log, f"B:{self.name}", tuple(-g for g in grads))


class FakeBlock(nn.Module):
    """attn (compute), dispatch (comm), experts (compute), combine (comm), like an MoE block."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log
        self.attn = Scale("attn", log)
        self.experts = Scale("experts", log)

    def sub_stages(self):
        return (ComputeStage("attn", self.attn), Swap("dispatch", self.log),
                ComputeStage("experts", self.experts), Swap("combine", self.log))


def _pair(log, store, overlap=True):
    """Run F of chunk a and B of chunk b (forwarded before) as a pair; return both chunks."""
    a, b = StagedChunk([FakeBlock(log)]), StagedChunk([FakeBlock(log)])
    if store is not None:
        for chunk in (a, b):
            for module in chunk.modules():
                if hasattr(module, "bind_weight_grad_store"):
                    module.bind_weight_grad_store(store)
    x_a = torch.randn(4, requires_grad=True)
    x_b = torch.randn(4, requires_grad=True)
    out_b = b(x_b)
    log.clear()
    results = {}
    forward = Side("F", a, lambda: (a.begin((x_a,)), (x_a,)),
                   lambda run, outs: results.__setitem__("f", run.stitch(outs)[0]))
    backward = Side("B", b, lambda: claim_backward(b, [out_b], [torch.ones(4)]),
                    lambda run, grads: run.deposit_input_grads(grads), backward=True, store=store)
    run_pair_sides(forward, backward, overlap=overlap)
    return a, b, x_b, results["f"]


def test_pair_follows_the_docstring_timeline() -> None:
    log = []
    _pair(log, store=None)
    # compute entries of Scale log only their name: F's come from forward, B's run inside autograd backward
    # (Scale.forward is not called there), so every ("compute", x) here is F's.
    assert log == [
        ("launch", "B:combine"), ("compute", "attn"), ("launch", "F:dispatch"), ("wait", "B:combine"),
        ("weight", "experts"), ("launch", "B:dispatch"), ("wait", "F:dispatch"), ("compute", "experts"),
        ("launch", "F:combine"), ("wait", "B:dispatch"), ("weight", "attn"), ("wait", "F:combine"),
    ]


def test_weight_parts_fill_the_wait_for_a_transfer() -> None:
    log = []
    _pair(log, store=WeightGradStore())
    # B's experts: input part, then dispatch⁻¹ launched, then its weight part while both transfers fly;
    # B's attn weight part runs after B has handed its input gradients on, while F's combine flies.
    assert log == [
        ("launch", "B:combine"), ("compute", "attn"), ("launch", "F:dispatch"), ("wait", "B:combine"),
        ("launch", "B:dispatch"), ("weight", "experts"), ("wait", "F:dispatch"), ("compute", "experts"),
        ("launch", "F:combine"), ("wait", "B:dispatch"), ("weight", "attn"), ("wait", "F:combine"),
    ]


@pytest.mark.parametrize("store", [None, WeightGradStore()], ids=["full-B", "W-split"])
def test_pair_gradients_equal_sequential(store) -> None:
    torch.manual_seed(0)
    results = []
    for overlap in (True, False):
        torch.manual_seed(0)
        a, b, x_b, out_a = _pair([], store, overlap=overlap)
        results.append((x_b.grad.clone(), [p.grad.clone() for p in b.parameters()], out_a.detach()))
    (g1, p1, o1), (g2, p2, o2) = results
    assert torch.equal(g1, g2) and torch.equal(o1, o2) and all(torch.equal(u, v) for u, v in zip(p1, p2))


def test_staged_chunk_equals_plain_module() -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)]
    plain, staged = nn.Sequential(*layers), StagedChunk(layers)
    x = torch.randn(4, 5, requires_grad=True)
    plain(x).square().sum().backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in plain.parameters()]
    x.grad = None
    plain.zero_grad(set_to_none=True)
    staged(x).square().sum().backward()
    got = [x.grad] + [p.grad for p in staged.parameters()]
    assert all(torch.equal(u, v) for u, v in zip(got, expected))
    with torch.no_grad():
        assert torch.equal(staged(x), plain(x))


def test_claimed_backward_equals_plain_backward() -> None:
    torch.manual_seed(0)
    chunk = StagedChunk([nn.Linear(5, 5), nn.Tanh()])
    x = torch.randn(4, 5, requires_grad=True)
    chunk(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    out = chunk(x)
    run, grads = claim_backward(chunk, [out.sum()], None)
    assert x.grad is None  # the claim stopped at the chunk
    run.deposit_input_grads(run.backward_all(grads))
    assert torch.equal(x.grad, expected)


def test_fallback_warns_once_and_returns_none() -> None:
    with pytest.warns(OverlapFallbackWarning, match="not StagedChunks") as record:
        assert overlap_engine_for([nn.Linear(2, 2), StagedChunk([nn.Linear(2, 2)])]) is None
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert overlap_engine_for([nn.Linear(2, 2)], warn=False) is None
        assert overlap_engine_for([StagedChunk([nn.Linear(2, 2)])]) is not None


def test_substage_protocol_is_checked() -> None:
    class Broken(nn.Module):
        def sub_stages(self):
            return [object()]

    with pytest.raises(TypeError, match="not a SubStage"):
        StagedChunk([Broken()])
    with pytest.raises(ValueError, match="at least one part"):
        StagedChunk([])


@pytest.fixture()
def world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_p1_pipeline_overlap_on_off_and_reference(world_of_one) -> None:
    """dualpipev on one rank (a two-stage V, with F&B pairs): bit-exact against each other and the model."""
    config = MoEConfig(dim=16, heads=2, num_experts=4, top_k=2, ffn_dim=24, vocab_size=32)
    C = 4
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (2 * C, 3), generator=generator)
    labels = torch.randint(0, 32, (2 * C, 3), generator=generator)
    results = []
    for overlap in (True, False):
        model = moe_layers(config, 4, seed=0)
        pipe = DualPipeline(moe_chunks(model, "dualpipev", 1, 0), "dualpipev", loss_fn=lm_loss, overlap=overlap)
        trace = []
        if overlap:
            pipe.executor.overlap.trace = trace
        result = pipe.step(tokens, labels, num_microbatches=C)
        pipe.close()
        results.append((result.losses, [p.grad.clone() for p in model.parameters()], trace))
    model = moe_layers(config, 4, seed=0)
    whole = StagedChunk(list(model.layers))
    losses = {}
    for g, (x, y) in enumerate(zip(tokens.chunk(C), labels.chunk(C))):
        loss = lm_loss(whole(x), y)
        (loss / C).backward()
        losses[g] = loss.detach()
    reference = [p.grad for p in model.parameters()]
    (on_losses, on_grads, trace), (off_losses, off_grads, _) = results
    assert {e.side for e in trace} >= {"F1:1", "B0:0"}  # the pairs went through the engine
    assert {e.what for e in trace} == {"compute", "comm", "weight"}
    for got in (on_losses, off_losses):
        assert all(torch.equal(got[g], losses[g]) for g in losses)
    for got in (on_grads, off_grads):
        assert all(torch.equal(u, v) for u, v in zip(got, reference))
