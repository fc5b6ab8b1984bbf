"""Reference of FreeCache (FlashDLM, arXiv 2505.21467), one sequence at a time,
dense.

The first forward computes every position (with a sliding window: the prompt and
the window). Every later step feeds the current block and everything after it
(with a window of W: the W canvas positions from the block's start, and nothing
beyond them is attended); the prompt's and the finished blocks' K/V stay as their
last forward left them. Dream has no blocks: its current block starts at the first
masked position, and the position before it is fed too (Dream reads a position's
logits from the hidden row before it).
"""

from __future__ import annotations

import torch

from vllm_dare.reference.cached_generation import (
    dream_generate_with_cache,
    llada_generate_with_cache,
)
from vllm_dare.reference.modeling import ReferenceDLLM


def llada_generate_freecache(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    window: int | None = None,
) -> tuple[list[int], dict]:
    """Greedy, low-confidence remasking. Returns the canvas and
    ``{"forwards", "computed_rows"}``."""
    L = len(prompt) + gen_length
    first = [True]

    def feed(x, start, end, step_in_block):
        stop = L if window is None else min(L, start + window)
        fed = torch.arange(0 if first[0] else start, stop)
        first[0] = False
        return fed, stop

    return llada_generate_with_cache(model, prompt, mask_id, gen_length, steps,
                                     block_length, feed)


def dream_generate_freecache(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    alg: str = "maskgit_plus",
) -> tuple[list[int], dict]:
    """Greedy. Returns the canvas and ``{"forwards", "computed_rows"}``."""
    L = len(prompt) + max_new_tokens
    first = [True]

    def feed(x, step):
        first_masked = int((x == mask_id).nonzero()[0])
        fed = torch.arange(0 if first[0] else first_masked - 1, L)
        first[0] = False
        return fed

    return dream_generate_with_cache(model, prompt, mask_id, max_new_tokens, steps, feed,
                                     alg=alg)
