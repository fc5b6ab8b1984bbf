"""``dllm_cache="dkv_pd"``: dKV-Cache PD (arXiv 2505.15781) for Dream: Prefill and
Decode together.

As ``dkv_decode`` on Dream (decoded tokens cached one forward after their step,
position j cacheable once token j + 1 is decoded), except that a refresh step
(every ``dllm_cache_refresh``-th, default 4) recomputes every position but the
prompt's: the prompt's K/V are computed by the first forward and never again (the
last prompt position stays fed: its row gives the first canvas position's logits).
"""

from __future__ import annotations

from vllm_dare.cache_policies.base import DenoisingView, ForwardPlan
from vllm_dare.cache_policies.dkv_decode import DkvDecode


class DkvPrefillDecode(DkvDecode):
    name = "dkv_pd"
    families = ("dream",)

    def refresh_plan(self, view: DenoisingView) -> ForwardPlan:
        return ForwardPlan.span(view.prompt_len - 1, view.prompt_len + view.gen_length)
