"""Runtime pieces without processes: shape headers, the B/W split of Linear layers, stage placement, and
a one-rank pipeline on a loopback transport.

Gradient comparisons are bit-exact (``torch.equal``) and run with one intra-op thread, as the ranks do.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.meta import HEADER_LEN, TensorMeta, decode_header, describe, encode_header
from dualpipe_plugin.runtime.pipeline import split_stages, stage_modules
from dualpipe_plugin.runtime.weight_grad import WeightGradStore, bind_weight_split
from dualpipe_plugin.schedules import OpKind, Pair, build_schedule
from tests.runtime.harness import Case, compare_to_reference, one_thread, reference, run_pipeline


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# -- meta.py: shape headers -------------------------------------------------------------------------------
def test_header_round_trip_of_several_tensors() -> None:
    metas = (
        TensorMeta((3, 4, 16), torch.float32, True),
        TensorMeta((2, 7), torch.bfloat16, True),
        TensorMeta((5,), torch.int64, False),
        TensorMeta((), torch.float16, False),
        TensorMeta((1, 1, 1, 2), torch.bool, False),
        TensorMeta((0, 3), torch.float64, True),
    )
    header = encode_header(metas, torch.device("cpu"))
    assert header.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    assert decode_header(header) == metas
    assert describe(metas[:3]) == "float32[3, 4, 16], bfloat16[2, 7], int64[5]"


def test_header_of_real_tensors() -> None:
    tensors = (torch.randn(2, 3, requires_grad=True).bfloat16(), torch.arange(6).view(2, 3))
    metas = tuple(TensorMeta.of(t) for t in tensors)
    assert metas == (TensorMeta((2, 3), torch.bfloat16, True), TensorMeta((2, 3), torch.int64, False))
    decoded = decode_header(encode_header(metas, torch.device("cpu")))
    buffers = [meta.empty(torch.device("cpu")) for meta in decoded]
    assert [(b.shape, b.dtype) for b in buffers] == [(t.shape, t.dtype) for t in tensors]


def test_header_with_too_many_tensors() -> None:
    # Each 3-d tensor takes 3 + 3 entries after the count: ten of them need 61 <= 64, eleven need 67.
    fits = tuple(TensorMeta((2, 3, 4), torch.float32, True) for _ in range(10))
    assert decode_header(encode_header(fits, torch.device("cpu"))) == fits
    with pytest.raises(PipelineConfigError) as info:
        encode_header(fits + fits[:1], torch.device("cpu"))
    message = str(info.value)
    assert "a stage output of 11 tensors" in message and f"does not fit the {HEADER_LEN}-entry header" in message
    assert "pack them into one" in message


def test_header_refuses_an_unsupported_dtype() -> None:
    with pytest.raises(PipelineConfigError, match="cannot send a torch.complex64 tensor between pipeline stages"):
        encode_header((TensorMeta((2,), torch.complex64, False),), torch.device("cpu"))


# -- weight_grad.py: the B/W split ----------------------------------------------------------------------
def _model(bias: bool, shared: bool = False) -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(8, 6, bias=bias)
    if shared:  # one Linear used twice: its two weight-gradient parts are summed before accumulating
        square = nn.Linear(8, 8, bias=bias)
        return nn.Sequential(square, nn.Tanh(), square, nn.LayerNorm(8))
    return nn.Sequential(first, nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 4, bias=bias))


def _inputs(shape: tuple[int, ...], requires_grad: bool, out_features: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, 8, generator=generator).requires_grad_(requires_grad)
    grad_out = torch.randn(*shape, out_features, generator=generator)
    return x, grad_out


def _call(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "plain":
        return model(x)
    return checkpoint(model, x, use_reentrant=(mode == "reentrant"))


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input"] = x.grad
    return grads


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None and torch.equal(got[name], value), name


SHAPES = [(12,), (3, 4)]  # 2-D and 3-D inputs


# Reentrant checkpointing back-propagates nothing when no input requires a gradient: no data-input case.
MODES = [("plain", True), ("plain", False), ("reentrant", True), ("non-reentrant", True), ("non-reentrant", False)]


@pytest.mark.parametrize("mode, input_grad", MODES, ids=[f"{m}-{'input-grad' if g else 'data-input'}" for m, g in MODES])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_split_linear_is_bit_identical_to_autograd(mode: str, input_grad: bool, bias: bool, shape) -> None:
    ref_model, model = _model(bias), _model(bias)
    x_ref, grad_out = _inputs(shape, input_grad, 4)
    _call(ref_model, x_ref, mode).backward(grad_out)
    expected = _grads(ref_model, x_ref)

    store = WeightGradStore()
    binding = bind_weight_split([model], store)
    assert binding.num_split_linears == 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    fired: list[tuple[str, bool]] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.append((name, p.grad is None)))

    # I: input gradients only; the Linear weights are not touched (no hook, no .grad).
    x, _ = _inputs(shape, input_grad, 4)
    out = _call(model, x, mode)
    assert "SplitLinear" in type(out.grad_fn).__name__ or mode != "plain"
    with store.capture((0, 3)):
        out.backward(grad_out)
    assert store.has((0, 3)) and store.pending_keys() == [(0, 3)]
    assert all(p.grad is None for m in linears for p in m.parameters())
    assert {name for name, _ in fired} == {"2.weight", "2.bias"}  # LayerNorm does not split
    if input_grad:
        assert torch.equal(x.grad, expected["input"])
    # W: the deferred weight gradients, each parameter's hook exactly once, never with None.
    store.flush((0, 3))
    assert not store.has((0, 3))
    _assert_same(_grads(model, x), expected)
    assert sorted(name for name, _ in fired) == sorted(name for name, _ in model.named_parameters())
    assert not [name for name, none in fired if none]

    # A full backward (no capture) accumulates at once, on top: twice the gradients, still exact.
    fired.clear()
    x2, _ = _inputs(shape, input_grad, 4)
    _call(model, x2, mode).backward(grad_out)
    _call(ref_model, x_ref.detach().requires_grad_(input_grad), mode).backward(grad_out)
    _assert_same({k: v for k, v in _grads(model, x2).items() if k != "input"},
                 {k: v for k, v in _grads(ref_model, x_ref).items() if k != "input"})
    assert len(fired) == len(list(model.parameters()))
    binding.unbind()


def test_parameter_used_twice_fires_its_hook_once() -> None:
    ref_model, model = _model(True, shared=True), _model(True, shared=True)
    x_ref, grad_out = _inputs((3, 4), True, 8)
    ref_model(x_ref).backward(grad_out)
    store = WeightGradStore()
    bind_weight_split([model], store)
    fired = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    x, _ = _inputs((3, 4), True, 8)
    with store.capture((1, 0)):
        model(x).backward(grad_out)
    store.flush((1, 0))
    _assert_same(_grads(model, x), _grads(ref_model, x_ref))
    assert sorted(fired) == sorted(name for name, _ in model.named_parameters())


def test_frozen_weights() -> None:
    ref_model, model = _model(True), _model(True)
    for m in (ref_model, model):
        m[0].weight.requires_grad_(False)  # bias still trains: the layer still splits
        m[3].weight.requires_grad_(False)
        m[3].bias.requires_grad_(False)  # nothing trains: plain F.linear
    x_ref, grad_out = _inputs((3, 4), True, 4)
    ref_model(x_ref).backward(grad_out)
    store = WeightGradStore()
    bind_weight_split([model], store)
    x, _ = _inputs((3, 4), True, 4)
    with store.capture((0, 0)):
        model(x).backward(grad_out)
    assert model[0].bias.grad is None
    store.flush((0, 0))
    got = _grads(model, x)
    assert got["0.weight"] is None and got["3.weight"] is None and got["3.bias"] is None
    _assert_same(got, _grads(ref_model, x_ref))


def test_unbind_restores_the_linear() -> None:
    model = _model(True)
    linear = model[0]
    store = WeightGradStore()
    binding = bind_weight_split([model], store)
    assert "forward" in linear.__dict__
    assert bind_weight_split([model], WeightGradStore()).num_split_linears == 0  # already bound: left alone
    x, _ = _inputs((3,), True, 4)
    assert type(linear(x).grad_fn).__name__ == "_SplitLinearBackward"
    binding.unbind()
    assert "forward" not in linear.__dict__ and linear.forward.__func__ is nn.Linear.forward
    assert "SplitLinear" not in type(linear(x).grad_fn).__name__
    assert binding.num_split_linears == 0
    binding.unbind()  # idempotent


def test_binding_skips_custom_linears_and_binds_cooperating_modules() -> None:
    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Cooperating(nn.Module):
        store = "unset"

        def bind_weight_grad_store(self, store):
            self.store = store

    own, coop = OwnForward(4, 4), Cooperating()
    store = WeightGradStore()
    binding = bind_weight_split([nn.Sequential(own, coop, nn.Linear(4, 4))], store)
    assert binding.num_split_linears == 1 and "forward" not in own.__dict__
    assert coop.store is store
    binding.unbind()
    assert coop.store is None


def test_store_misuse() -> None:
    store = WeightGradStore()
    with pytest.raises(RuntimeError, match=r"W for chunk 0 micro-batch 5 has no pending I"):
        store.flush((0, 5))
    with store.capture((0, 1)):
        with pytest.raises(RuntimeError, match=r"capture for \(1, 1\) started inside the capture for \(0, 1\)"):
            with store.capture((1, 1)):
                pass
    assert not store.capturing
    store.clear()
    assert store.pending_keys() == []


# -- pipeline.py: stage placement -----------------------------------------------------------------------
def test_split_stages_sizes_and_order() -> None:
    layers = [nn.Identity() for _ in range(10)]
    parts = split_stages(layers, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert [layer for part in parts for layer in part] == layers
    assert split_stages(layers, 10) == [[layer] for layer in layers]
    with pytest.raises(PipelineConfigError, match="cannot cut 3 layers into 4 pipeline stages; give at least one layer per stage"):
        split_stages(layers[:3], 4)


def _stage_of(chunk: nn.Module, parts: list[list[nn.Module]]) -> int:
    held = list(chunk)
    matches = [s for s, part in enumerate(parts) if len(part) == len(held) and all(a is b for a, b in zip(part, held))]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_dualpipev_rank_holds_stages_r_and_2p_minus_1_minus_r(ranks: int) -> None:
    layers = [nn.Linear(2, 2) for _ in range(2 * ranks * 2)]
    parts = split_stages(layers, 2 * ranks)
    held = []
    for rank in range(ranks):
        chunks = stage_modules(layers, "dualpipev", ranks, rank)
        assert [_stage_of(chunk, parts) for chunk in chunks] == [rank, 2 * ranks - 1 - rank]
        held += [_stage_of(chunk, parts) for chunk in chunks]
    assert sorted(held) == list(range(2 * ranks))  # every stage exactly once: 1x parameters


@pytest.mark.parametrize("ranks", [2, 4])
def test_dualpipe_rank_holds_stage_r_and_its_mirror(ranks: int) -> None:
    layers = [nn.Linear(2, 2) for _ in range(ranks)]
    parts = split_stages(layers, ranks)
    for rank in range(ranks):
        chunks = stage_modules(layers, "dualpipe", ranks, rank)
        assert [_stage_of(chunk, parts) for chunk in chunks] == [rank, ranks - 1 - rank]
        placement = build_schedule("dualpipe", ranks, 2 * ranks).placement
        assert placement.mirror_of(rank, 0) == (ranks - 1 - rank, 1)


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_one_chunk_schedules_hold_stage_r(name: str) -> None:
    layers = [nn.Linear(2, 2) for _ in range(7)]
    parts = split_stages(layers, 3)
    for rank in range(3):
        chunks = stage_modules(layers, name, 3, rank)
        assert len(chunks) == 1 and _stage_of(chunks[0], parts) == rank


# -- one rank, no processes: dualpipev P=1 on a loopback transport ---------------------------------------
class Loopback:
    """The transport of a one-rank pipeline: the V's turn is a local hand-over, the all-reduce a no-op."""

    rank, size, device = 0, 1, torch.device("cpu")

    def start(self, ops):
        assert not ops, "a one-rank pipeline has nothing to send"
        return []

    def all_reduce_sum(self, tensor, **_):
        pass


@pytest.mark.parametrize(
    "case",
    [Case("dualpipev", 1, 2), Case("dualpipev", 1, 5, steps=2, vary_seq=True),
     Case("dualpipev", 1, 3, checkpoint=True), Case("dualpipev", 1, 3, forward_only=True),
     Case("zb1p", 1, 3), Case("1f1b", 1, 1, optimizer="adam", steps=2)],
    ids=lambda c: c.id,
)
def test_one_rank_pipeline_in_process(case: Case) -> None:
    report = run_pipeline(0, 1, case, transport=Loopback())
    ref = reference(case)
    compare_to_reference(case, [report], ref)
    assert [torch.equal(a, b) for a, b in zip(report["total_losses"], ref["mean_loss"])] == [True] * case.steps
    if case.optimizer:
        assert all(torch.equal(report["params"][name], value) for name, value in ref["params"].items())


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("schedule", ["dualpipev", "1f1b"])
def test_a_full_backward_hands_no_weight_gradient_over_by_hand(schedule: str, checkpoint: bool, monkeypatch) -> None:
    """Forwards whose backward is a full B run their split Linears plain (weight_grad's module docstring):
    weight gradients reach autograd by hand only in W ops, never once per Linear inside a B, and the
    step stays bit-exact (activation checkpointing's recompute included)."""
    import dualpipe_plugin.runtime.weight_grad as weight_grad

    handed_over = []
    original = weight_grad.accumulate_weight_grads
    monkeypatch.setattr(weight_grad, "accumulate_weight_grads",
                        lambda grads: (handed_over.append(len(grads)), original(grads))[1])
    case = Case(schedule, 1, 4, checkpoint=checkpoint)
    report = run_pipeline(0, 1, case, transport=Loopback())
    compare_to_reference(case, [report], reference(case))
    actions = build_schedule(schedule, 1, 4).actions[0]
    full_backwards = sum(1 for a in actions if isinstance(a, Pair) or a.kind is OpKind.B)
    weight_ops = sum(1 for a in actions if not isinstance(a, Pair) and a.kind is OpKind.W)
    assert full_backwards > 0
    assert len(handed_over) == weight_ops


def _pair_send_rank(rank: int, world_size: int) -> tuple[int, int]:
    """dualpipev P=2 with sequential pairs: (backward halves of pairs that found a queued send, pairs)."""
    from dualpipe_plugin.runtime.executor import PipelineExecutor

    seen = [0, 0]
    run_backward = PipelineExecutor._run_backward

    def checked(self, op):
        if self._in_pair:
            seen[0] += bool(self._comm._queued)
            seen[1] += 1
        return run_backward(self, op)

    dispatch = PipelineExecutor._dispatch

    def marking(self, action):
        self._in_pair = isinstance(action, Pair)
        return dispatch(self, action)

    PipelineExecutor._run_backward, PipelineExecutor._dispatch = checked, marking
    case = Case("dualpipev", world_size, 6)
    run_pipeline(rank, world_size, case)
    return tuple(seen)


@pytest.mark.slow
def test_a_sequential_pair_hands_its_forward_outputs_on_before_its_backward_half() -> None:
    from dualpipe_plugin.launch import run_local

    results = run_local(_pair_send_rank, 2, timeout_s=120)
    assert all(pairs > 0 for _, pairs in results)
    assert [queued for queued, _ in results] == [0, 0]
