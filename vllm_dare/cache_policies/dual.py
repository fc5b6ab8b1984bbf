"""``dllm_cache="dual"``: Fast-dLLM's DualCache (arXiv 2505.22618).

The first step of each block runs a full forward that refreshes every layer's
K/V. Every later step of the block feeds the current block only; it attends to
the prefix and the suffix as the block-start forward cached them (both stale
until the next block start) and to itself. LLaDA's semi-autoregressive blocks,
or Fast-dLLM's block-wise Dream generation (``dllm_block_length`` on a Dream
request), define prefix and suffix.
"""

from __future__ import annotations

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan


class DualCache(CachePolicy):
    name = "dual"
    dream_generations = ("blockwise",)

    def plan(self, view: DenoisingView) -> ForwardPlan:
        if view.block_start:
            return FEED_ALL
        return ForwardPlan.span(view.prompt_len + view.block[0],
                                view.prompt_len + view.block[1])
