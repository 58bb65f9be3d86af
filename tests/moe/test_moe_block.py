"""The MoE model in one process (no EP group): routing, the sub-staged block against dense math, bad input."""

from __future__ import annotations

import pytest
import torch

from dualpipe_plugin.moe import MoEBlock, MoEConfig, MoEConfigError, TopKRouter, lm_loss, moe_chunks, moe_layers, route
from dualpipe_plugin.moe import dispatcher
from dualpipe_plugin.runtime.staged import StageKind, StagedChunk
from tests.moe.harness import dense_forward

CONFIG = MoEConfig(dim=16, heads=2, num_experts=6, top_k=2, ffn_dim=24, vocab_size=32)


def test_route_sorts_copies_by_expert_and_counts_zeros() -> None:
    experts = torch.tensor([[2, 0], [2, 1], [0, 2]])
    routing = route(experts, 4)
    assert routing.counts.tolist() == [2, 1, 3, 0]  # expert 3 gets no token
    assert experts.reshape(-1)[routing.order].tolist() == [0, 0, 1, 2, 2, 2]
    assert routing.tokens.tolist() == [0, 2, 1, 0, 1, 2]  # stable: token order within an expert


def test_block_has_the_four_sub_stages() -> None:
    stages = MoEBlock(CONFIG).sub_stages()
    assert [(s.name, s.kind) for s in stages] == [
        ("attn", StageKind.COMPUTE), ("dispatch", StageKind.COMM),
        ("experts", StageKind.COMPUTE), ("combine", StageKind.COMM),
    ]


@pytest.mark.parametrize("repeat_token", [False, True], ids=["random", "one-token"])
def test_staged_model_matches_dense_math(repeat_token) -> None:
    """Tolerance rtol=1e-5: the dense loop sums an expert's rows in other groupings than the dispatcher."""
    tokens = torch.randint(0, 32, (3, 4), generator=torch.Generator().manual_seed(0))
    if repeat_token:  # every token takes the same two experts: the other four get zero rows
        tokens[:] = 5
    labels = torch.randint(0, 32, (3, 4), generator=torch.Generator().manual_seed(1))
    staged_model, dense_model = moe_layers(CONFIG, 2, seed=0), moe_layers(CONFIG, 2, seed=0)
    routing = []
    dense_loss = lm_loss(dense_forward(dense_model, tokens, routing), labels)
    if repeat_token:
        assert all((counts == 0).sum() == CONFIG.num_experts - CONFIG.top_k for counts in routing)
    staged_loss = lm_loss(StagedChunk(list(staged_model.layers))(tokens), labels)
    torch.testing.assert_close(staged_loss, dense_loss, rtol=1e-5, atol=1e-6)
    staged_loss.backward()
    dense_loss.backward()
    for (name, p), q in zip(staged_model.named_parameters(), dense_model.parameters()):
        if q.grad is None:  # an expert no token reached
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_staged_chunks_nest_into_one_flat_chunk() -> None:
    """A StagedChunk given as a part (DeepSpeed's PipelineModule handing us staged layers) contributes its
    own sub-stages: the outer chunk is flat, and its numbers are bit-identical to the un-nested chunk's."""
    tokens = torch.randint(0, 32, (3, 4), generator=torch.Generator().manual_seed(0))
    flat_model, nested_model = moe_layers(CONFIG, 2, seed=0), moe_layers(CONFIG, 2, seed=0)
    flat = StagedChunk(list(flat_model.layers))
    embedding, first, second, head = nested_model.layers
    nested = StagedChunk([embedding, StagedChunk([first]), StagedChunk([second, head])])
    assert nested.kinds == flat.kinds
    assert len(nested.stages) == len(flat.stages) == 1 + 2 * 4 + 1
    flat(tokens).float().pow(2).mean().backward()
    nested(tokens).float().pow(2).mean().backward()
    for (name, p), q in zip(flat_model.named_parameters(), nested_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_chunks_cut_embedding_blocks_and_head() -> None:
    model = moe_layers(CONFIG, 4, seed=0)
    first, last = moe_chunks(model, "dualpipev", 2, 0)  # stages 0 and 3
    assert [type(p).__name__ for p in first.parts] == ["Embedding", "MoEBlock"]
    assert [type(p).__name__ for p in last.parts] == ["MoEBlock", "Head"]
    with pytest.raises(MoEConfigError, match="at least one block per stage"):
        moe_chunks(moe_layers(CONFIG, 2, seed=0), "dualpipev", 2, 0)


def test_same_seed_same_model_any_ep_rank() -> None:
    a, b = moe_layers(CONFIG, 1, seed=3), moe_layers(CONFIG, 1, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=7, num_experts=6), "top_k=7 exceeds num_experts=6"),
        (dict(dim=10, heads=4), "not divisible by heads"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(wire_padding=-1), "wire_padding"),
    ],
)
def test_bad_config_is_refused(kwargs, match) -> None:
    with pytest.raises(MoEConfigError, match=match):
        MoEConfig(**kwargs)


def test_router_refuses_top_k_above_experts() -> None:
    with pytest.raises(MoEConfigError, match="between 1 and num_experts"):
        TopKRouter(8, 4, 5)


def test_ep_group_must_divide_the_experts(monkeypatch) -> None:
    monkeypatch.setattr(dispatcher.dist, "get_world_size", lambda group: 4)
    monkeypatch.setattr(dispatcher.dist, "get_rank", lambda group: 0)
    with pytest.raises(MoEConfigError, match="6 experts cannot be spread evenly over an expert-parallel group of 4"):
        MoEBlock(CONFIG, dispatcher.ExpertParallel(object()))
    assert isinstance(MoEConfigError("x"), ValueError)
