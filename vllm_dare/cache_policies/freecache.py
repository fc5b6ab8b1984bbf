"""``dllm_cache="freecache"``: FreeCache (FlashDLM, arXiv 2505.21467).

The first forward computes every position. From then on each step feeds the
current block and everything after it; the K/V of the prompt and of finished
blocks stay frozen as their last forward left them (no refresh). For Dream, whose
generation has no blocks, the current block starts at the first masked position,
and the position before it is fed too (its hidden row gives that position's
logits).

Sliding window (``dllm_cache_window`` = W, LLaDA): only the W canvas positions
from the current block's start are fed and attended; masks beyond them are
dropped from the forward (the first forward covers the prompt and that window).
W must be at least the block length.
"""

from __future__ import annotations

import numpy as np

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan


class FreeCache(CachePolicy):
    name = "freecache"
    uses_window = True

    def __init__(self, params):
        super().__init__(params)
        self.window = params.cache_window
        self.first = True

    @classmethod
    def check(cls, params) -> None:
        if params.cache_window is None:
            return
        if params.family != "llada":
            raise ValueError("dllm_cache_window of dllm_cache='freecache' applies to "
                             "LLaDA models only (Dream's generation has no blocks)")
        if params.cache_window < params.block_length:
            raise ValueError(f"dllm_cache_window={params.cache_window} must be at least the "
                             f"block length {params.block_length}")

    def plan(self, view: DenoisingView) -> ForwardPlan:
        P, L = view.prompt_len, view.prompt_len + view.gen_length
        if self.params.family == "llada":
            start = P + view.block[0]
        else:
            start = P + int(np.argmax(view.masked)) - 1
        stop = L if self.window is None else min(L, P + view.block[0] + self.window)
        first, self.first = self.first, False
        if first:
            return FEED_ALL if self.window is None else ForwardPlan.span(0, stop, stop)
        return ForwardPlan.span(start, stop, None if self.window is None else stop)
