"""A small generated corpus, so the demo needs no download: sentences from a tiny grammar, char tokens.

The text is regular enough (a few dozen words, fixed sentence shapes) that a small model's loss falls
visibly within a few dozen steps, and varied enough (random choices) that it cannot be memorised at once.
"""

from __future__ import annotations

import random

import torch

__all__ = ["ALPHABET", "generate_text", "encode", "CorpusBatches"]

ALPHABET = " .abcdefghijklmnopqrstuvwxyz"
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the pilot", "a small bird", "the teacher"]
_VERBS = ["sees", "finds", "likes", "paints", "follows", "answers", "carries"]
_OBJECTS = ["the red ball", "a green box", "the river", "some bread", "the last train", "a quiet song"]
_PLACES = ["in the park", "at night", "near the sea", "after lunch", "on the hill", "every day"]


def generate_text(sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
        for _ in range(sentences)
    )


def encode(text: str) -> torch.Tensor:
    index = {char: i for i, char in enumerate(ALPHABET)}
    return torch.tensor([index[char] for char in text], dtype=torch.int64)


class CorpusBatches:
    """Deterministic (tokens, next-token labels) batches of ``batch`` windows of ``seq_len`` characters."""

    def __init__(self, seq_len: int, batch: int, sentences: int = 4000, seed: int = 0):
        self.tokens = encode(generate_text(sentences, seed))
        self.seq_len, self.batch = seq_len, batch

    def get(self, step: int, replica: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(10_007 * step + replica)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch,), generator=generator)
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
