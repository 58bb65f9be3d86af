"""The DeepSpeed example's data: a character-level corpus generated from a small grammar (no download) and
the micro-batches of one data-parallel replica, a pure function of the step."""

from __future__ import annotations

import random

import torch

__all__ = ["make_corpus", "batches"]


_SUBJECTS = ["the pipeline", "a rank", "the scheduler", "every stage", "the expert", "a micro-batch",
             "the first chunk", "the mirrored copy", "the optimizer", "the router"]
_VERBS = ["sends", "receives", "overlaps", "computes", "waits for", "forwards", "reduces", "hides",
          "splits", "defers"]
_OBJECTS = ["the activations", "its gradients", "a bubble", "the all-to-all", "two chunks", "the weights",
            "the loss", "the next batch", "a tensor", "the schedule"]
_ENDINGS = [".", " quickly.", " in both directions.", " without a bubble.", " before the next step.",
            " and then rests."]


def make_corpus(seed: int, sentences: int = 4000) -> torch.Tensor:
    """A deterministic ASCII text from a small grammar, as a 1-D int64 tensor of byte values."""
    rng = random.Random(seed)
    text = " ".join(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        for _ in range(sentences)
    )
    return torch.tensor(list(text.encode("ascii")), dtype=torch.long)


def batches(corpus: torch.Tensor, args, micro_batch_size: int, micro_batches: int, dp_id: int, start_step: int):
    """Endless (inputs, labels) micro-batches for one data-parallel replica; a pure function of the step."""
    per_step = 0
    step = start_step
    while True:
        generator = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 1009 + dp_id) * 1013 + per_step)
        starts = torch.randint(0, corpus.numel() - args.seq_len - 1, (micro_batch_size,), generator=generator)
        window = torch.stack([corpus[s : s + args.seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]
        per_step += 1
        if per_step == micro_batches:
            per_step, step = 0, step + 1

