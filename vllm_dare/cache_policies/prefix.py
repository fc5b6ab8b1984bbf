"""``dllm_cache="prefix"``: Fast-dLLM's PrefixCache (arXiv 2505.22618).

The first step of each block runs a full forward (it refreshes every layer's
K/V and its logits decode, like any step). Every later step of the block feeds
the current block and the whole masked suffix after it; they attend to the
prefix's K/V cached by the block-start forward (prompt and finished blocks) and
to themselves. LLaDA's semi-autoregressive blocks, or Fast-dLLM's block-wise
Dream generation (``dllm_block_length`` on a Dream request), define the prefix.
"""

from __future__ import annotations

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan


class PrefixCache(CachePolicy):
    name = "prefix"
    dream_generations = ("blockwise",)

    def plan(self, view: DenoisingView) -> ForwardPlan:
        if view.block_start:
            return FEED_ALL
        return ForwardPlan.span(view.prompt_len + view.block[0],
                                view.prompt_len + view.gen_length)
