"""``dllm_cache="dkv_greedy"``: dKV-Cache Greedy (arXiv 2505.15781).

The decoding order is known in advance: random remasking with one random number
per position drawn at each block start (``LLaDAKnownOrderDenoiser``). Every
``dllm_cache_refresh``-th step of a block (default 2; the block's first step
included) is a full forward that caches every position's K/V. Any other step
feeds only

* the positions the previous step decoded (their K/V with their new tokens),
* the positions this step will decode (their logits), and
* a window of ``dllm_cache_window`` (default 4) masked neighbours of each of
  those, found by looking alternately left and right of it over the whole
  sequence (positions masked before the previous step, not yet picked),

and the rest is read from the cache as the last forward that fed it left it.
LLaDA with ``dllm_remasking="random"`` only; no classifier-free guidance (the
authors' code has none with the cache).
"""

from __future__ import annotations

import numpy as np

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan

DEFAULT_REFRESH = 2
DEFAULT_WINDOW = 4


def window_positions(picked: np.ndarray, around, masked: np.ndarray,
                     window: int) -> None:
    """Mark in ``picked`` (bool, whole sequence) up to ``window`` positions per
    position of ``around`` (in order): masked ones not yet picked, looking
    alternately one further to the left and one further to the right."""
    n = picked.shape[0]
    for position in around:
        left, right, found, look_left = position - 1, position + 1, 0, True
        while found < window and (left >= 0 or right < n):
            if look_left:
                if left >= 0 and masked[left] and not picked[left]:
                    picked[left] = True
                    found += 1
                left -= 1
            else:
                if right < n and masked[right] and not picked[right]:
                    picked[right] = True
                    found += 1
                right += 1
            look_left = not look_left


class DkvGreedy(CachePolicy):
    name = "dkv_greedy"
    families = ("llada",)
    uses_refresh = True
    uses_window = True

    def __init__(self, params):
        super().__init__(params)
        self.refresh = params.cache_refresh or DEFAULT_REFRESH
        self.window = DEFAULT_WINDOW if params.cache_window is None else params.cache_window
        self.masked_before: np.ndarray | None = None  # canvas, at the previous forward

    @classmethod
    def check(cls, params) -> None:
        if params.remasking != "random":
            raise ValueError("dllm_cache='dkv_greedy' decodes in an order drawn in "
                             "advance and needs dllm_remasking='random'")
        if params.cfg_scale > 0:
            raise ValueError("dllm_cache='dkv_greedy' does not support classifier-free "
                             "guidance (dllm_cfg_scale > 0)")

    def plan(self, view: DenoisingView) -> ForwardPlan:
        before, self.masked_before = self.masked_before, view.masked
        if before is None or view.step_in_block % self.refresh == 0:
            return FEED_ALL
        P = view.prompt_len
        masked_then = np.concatenate([np.zeros(P, dtype=bool), before])
        decoded = np.flatnonzero(before & ~view.masked) + P
        upcoming = np.asarray(view.next_unmasked) + P
        picked = np.zeros(P + view.gen_length, dtype=bool)
        picked[upcoming] = True
        picked[decoded] = True
        window_positions(picked, upcoming, masked_then, self.window)
        return ForwardPlan(np.flatnonzero(picked))
