"""Reference of dKV-Cache Decode (arXiv 2505.15781) for LLaDA's semi-autoregressive
generation, one sequence at a time, dense.

Within each block, step ``i``:

* ``i`` is 0 or 1, or a multiple of ``cache_reloading_step``: a full forward over
  prompt + canvas (every position's K/V recomputed and cached);
* otherwise the forward feeds only the positions that were masked at the
  previous forward -- the still masked ones, whose K/V are never cached, and the
  ones the previous step decoded, whose K/V are computed now, with their decoded
  token as input, and cached from now on (the one-step delay). Every other
  position (prompt, tokens decoded earlier) is read from the cache.

Each step then decodes from the logits of the block's masked positions exactly as
LLaDA's low-confidence / random remasking step does. A step whose schedule
unmasks nothing changes nothing and is left out (its index still counts).
"""

from __future__ import annotations

import torch

from vllm_dare.reference.generation import _block_schedule
from vllm_dare.reference.modeling import ReferenceDLLM


@torch.no_grad()
def llada_generate_dkv_decode(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    cache_reloading_step: int = 8,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], dict]:
    """Returns the canvas and ``{"forwards", "computed_rows"}``."""
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    kv_cache = model.new_kv_cache(L)
    figures = {"forwards": 0, "computed_rows": 0}
    masked_at_previous_forward = None

    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = _block_schedule(block_length, steps_per_block)
        for i in range(steps_per_block):
            if counts[i] == 0:
                continue
            is_mask = x == mask_id
            if i <= 1 or i % cache_reloading_step == 0:
                fed = torch.arange(L)
            else:
                fed = masked_at_previous_forward.nonzero().squeeze(-1)
            masked_at_previous_forward = is_mask
            hidden = model.cached_hidden_states(x, fed, kv_cache)
            figures["forwards"] += 1
            figures["computed_rows"] += fed.numel() * model.spec.num_layers
            # The block's masked positions: the only ones this step may unmask.
            eligible = torch.arange(start, end)[is_mask[start:end]]
            logits = model.logits_of(hidden[torch.searchsorted(fed, eligible)])
            if temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                lg = logits.to(torch.float64)
                noise = torch.rand((gen_length, lg.shape[-1]), dtype=torch.float64,
                                   generator=generator)[eligible - P]
                x0 = (lg.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                confidence = p.gather(-1, x0[:, None]).squeeze(-1)
            else:
                confidence = torch.rand(gen_length, dtype=torch.float64,
                                        generator=generator)[eligible - P]
            chosen = torch.topk(confidence, counts[i]).indices
            x[eligible[chosen]] = x0[chosen]
    return x[P:].tolist(), figures
