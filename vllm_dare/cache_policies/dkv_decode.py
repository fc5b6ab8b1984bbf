"""``dllm_cache="dkv_decode"``: dKV-Cache Decode (arXiv 2505.15781) for LLaDA.

A decoded token's K/V are computed once, at the forward after the step that
decoded it (its decoded identity is then its input), and read from the cache
from then on; masked tokens are always fed. Per block: its first two steps run
full forwards; then step ``i`` feeds the positions that were masked at the
previous forward (the still masked ones and those the previous step decoded),
and every ``dllm_cache_refresh``-th step of the block (paper: 8 for LLaDA) runs
a full forward that recomputes every cached token. The prompt is cached like a
decoded token. Classifier-free guidance is not part of the method.
"""

from __future__ import annotations

import numpy as np

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan

DEFAULT_REFRESH = 8


class DkvDecode(CachePolicy):
    name = "dkv_decode"
    families = ("llada",)
    uses_refresh = True

    def __init__(self, params):
        super().__init__(params)
        self.refresh = params.cache_refresh or DEFAULT_REFRESH
        self.masked_before: np.ndarray | None = None  # at the previous forward

    @classmethod
    def check(cls, params) -> None:
        if params.cfg_scale > 0:
            raise ValueError("dllm_cache='dkv_decode' does not support classifier-free "
                             "guidance (dllm_cfg_scale > 0)")

    def plan(self, view: DenoisingView) -> ForwardPlan:
        before, self.masked_before = self.masked_before, view.masked
        i = view.step_in_block
        if i <= 1 or i % self.refresh == 0 or before is None:
            return FEED_ALL
        return ForwardPlan(view.prompt_len + np.flatnonzero(before))
