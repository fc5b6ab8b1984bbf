"""``dllm_cache="dkv_prefill"``: dKV-Cache Prefill (arXiv 2505.15781) for Dream.

The first forward computes every position; from then on the prompt's K/V are
read from the cache and never refreshed, and every canvas position is fed at
every step. With Dream's shift the last prompt position stays fed: its hidden
row gives the first canvas position's logits.
"""

from __future__ import annotations

import numpy as np

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan


class DkvPrefill(CachePolicy):
    name = "dkv_prefill"
    families = ("dream",)

    def __init__(self, params):
        super().__init__(params)
        self.first = True

    def plan(self, view: DenoisingView) -> ForwardPlan:
        if self.first:
            self.first = False
            return FEED_ALL
        return ForwardPlan(np.arange(view.prompt_len - 1, view.prompt_len + view.gen_length))
