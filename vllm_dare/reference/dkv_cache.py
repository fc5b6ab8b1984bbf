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


def _dream_cacheable(P: int, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Dream's rule: position j's K/V may be cached once token j + 1 is decoded
    (its hidden row then gives no logits any more); the last position once its
    own token is. The prompt counts as decoded."""
    decoded = x != mask_id
    decoded[:P] = True
    return torch.cat([decoded[1:], decoded[-1:]])


@torch.no_grad()
def dream_generate_dkv(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    cache: str,
    cache_reloading_step: int = 4,
    alg: str = "maskgit_plus",
    eps: float = 1e-3,
) -> tuple[list[int], dict]:
    """dKV-Cache for Dream's ``diffusion_generate`` (greedy), ``cache`` one of:

    * ``"decode"``: forward ``i`` feeds the positions that were not cacheable at
      the previous forward; a full forward at every ``cache_reloading_step``-th
      step (the first included);
    * ``"prefill"``: the first forward is full; every later one feeds the last
      prompt position and the canvas (the prompt's K/V are never refreshed).

    Logits of position p come from the hidden row of p - 1. A step that would
    unmask nothing (its transfer count truncates to 0) is left out, as the
    engine does; its index still counts. Returns the canvas and
    ``{"forwards", "computed_rows"}``."""
    assert cache in ("decode", "prefill") and alg != "origin"
    P = len(prompt)
    L = P + max_new_tokens
    x = torch.tensor(prompt + [mask_id] * max_new_tokens, dtype=torch.long)
    kv_cache = model.new_kv_cache(L)
    timesteps = torch.linspace(1, eps, steps + 1)
    figures = {"forwards": 0, "computed_rows": 0}
    cacheable_before = None
    for i in range(steps):
        mask_index = x == mask_id
        num_mask = int(mask_index.sum())
        if num_mask == 0:
            break
        t, s = timesteps[i], timesteps[i + 1]
        n = int(torch.tensor(float(num_mask)) * (1 - s / t)) if i < steps - 1 else num_mask
        if n == 0:
            continue
        if cache == "decode":
            full = cacheable_before is None or i % cache_reloading_step == 0
            fed = torch.arange(L) if full else (~cacheable_before).nonzero().squeeze(-1)
            cacheable_before = _dream_cacheable(P, x, mask_id)
        else:
            fed = torch.arange(L) if figures["forwards"] == 0 else torch.arange(P - 1, L)
        hidden = model.cached_hidden_states(x, fed, kv_cache)
        figures["forwards"] += 1
        figures["computed_rows"] += fed.numel() * model.spec.num_layers
        positions = mask_index.nonzero().squeeze(-1)
        rows = torch.searchsorted(fed, positions - 1)  # Dream's shift
        logits = model.logits_of(hidden[rows])
        probs = torch.softmax(logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            top2 = torch.topk(probs, 2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
        chosen = torch.topk(confidence, n).indices
        x[positions[chosen]] = x0[chosen]
    return x[P:].tolist(), figures
