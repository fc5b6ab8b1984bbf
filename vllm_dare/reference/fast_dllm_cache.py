"""Reference of Fast-dLLM's PrefixCache and DualCache (arXiv 2505.22618) for
LLaDA's semi-autoregressive generation, one sequence at a time, dense.

Per block of the canvas:

1. The block's first step runs a full forward over prompt + canvas. It writes
   every position's K/V into the cache and its logits decode, as any step.
2. Each later step of the block feeds
   * PrefixCache: the block and everything after it (the masked suffix);
   * DualCache: the block only;
   the fed tokens attend to the cached K/V of the positions not fed (as the
   block-start forward left them) and to their own fresh K/V.
3. The step decodes from the logits of the block's masked positions exactly as
   LLaDA's low-confidence / random remasking step does.
"""

from __future__ import annotations

import torch

from vllm_dare.reference.cached_generation import llada_generate_with_cache
from vllm_dare.reference.modeling import ReferenceDLLM

CACHES = ("prefix", "dual")


def llada_generate_cached(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    cache: str,
    **decoding,
) -> tuple[list[int], dict]:
    """``decoding``: ``remasking``, ``temperature``, ``cfg_scale``, ``generator``.
    Returns the canvas and ``{"forwards", "computed_rows"}`` (token-layer rows
    the forwards fed; the engine's figures add its prompt-only pass)."""
    assert cache in CACHES
    L = len(prompt) + gen_length

    def feed(x, start, end, step_in_block):
        if step_in_block == 0:
            return torch.arange(L), None  # block start: refresh every position
        return torch.arange(start, L if cache == "prefix" else end), None

    return llada_generate_with_cache(model, prompt, mask_id, gen_length, steps,
                                     block_length, feed, **decoding)
