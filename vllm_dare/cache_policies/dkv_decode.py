"""``dllm_cache="dkv_decode"``: dKV-Cache Decode (arXiv 2505.15781).

A decoded token's K/V are computed once, at the forward after the step that
decoded it (its decoded identity is then its input), and read from the cache
from then on; masked tokens are always fed. The prompt is cached like a decoded
token. Step ``i`` feeds the positions that were not cacheable at the previous
forward; every ``dllm_cache_refresh``-th step runs a full forward that recomputes
every cached token.

* LLaDA (per block, the cache restarts at each block): a position is cacheable
  once its token is decoded; the block's first two steps are full forwards;
  refresh default 8 (the paper's setting).
* Dream (the whole canvas): a position's hidden row gives the logits of the next
  position, so position ``j`` becomes cacheable when token ``j + 1`` is decoded
  (the last position: when its own token is); the first step is a full forward;
  refresh default 4 (the paper's setting).

Classifier-free guidance is not part of the method.
"""

from __future__ import annotations

import numpy as np

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan

DEFAULT_REFRESH = {"llada": 8, "dream": 4}


def cacheable(prompt_len: int, masked: np.ndarray, shifted: bool) -> np.ndarray:
    """bool over prompt + canvas: the positions whose K/V may be read from the
    cache given the canvas's ``masked`` positions (``shifted``: Dream's rule)."""
    decoded = np.concatenate([np.ones(prompt_len, dtype=bool), ~masked])
    if not shifted:
        return decoded
    out = np.empty_like(decoded)
    out[:-1] = decoded[1:]
    out[-1] = decoded[-1]
    return out


class DkvDecode(CachePolicy):
    name = "dkv_decode"
    families = ("llada", "dream")
    uses_refresh = True

    def __init__(self, params):
        super().__init__(params)
        self.refresh = params.cache_refresh or DEFAULT_REFRESH[params.family]
        self.shifted = params.family == "dream"
        self.full_steps = 1 if self.shifted else 2  # steps < this run full forwards
        self.masked_before: np.ndarray | None = None  # at the previous forward

    @classmethod
    def check(cls, params) -> None:
        if params.cfg_scale > 0:
            raise ValueError("dllm_cache='dkv_decode' does not support classifier-free "
                             "guidance (dllm_cfg_scale > 0)")

    def plan(self, view: DenoisingView) -> ForwardPlan:
        before, self.masked_before = self.masked_before, view.masked
        i = view.step_in_block
        if before is None or i < self.full_steps:
            return FEED_ALL
        if i % self.refresh == 0:
            return self.refresh_plan(view)
        return ForwardPlan(np.flatnonzero(~cacheable(view.prompt_len, before, self.shifted)))

    def refresh_plan(self, view: DenoisingView) -> ForwardPlan:
        """The forward of a refresh step: every position."""
        return FEED_ALL
