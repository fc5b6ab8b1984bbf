"""``dllm_cache="none"``: the exact reference forward. Every position of the
sequence is fed and attends to every other, at every step."""

from __future__ import annotations

from vllm_dare.cache_policies.base import FEED_ALL, CachePolicy, DenoisingView, ForwardPlan


class NoCache(CachePolicy):
    name = "none"
    dream_generations = ("official", "blockwise")

    def plan(self, view: DenoisingView) -> ForwardPlan:
        return FEED_ALL
