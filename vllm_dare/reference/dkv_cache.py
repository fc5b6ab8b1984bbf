"""Reference of dKV-Cache (arXiv 2505.15781), one sequence at a time, dense.

Decode: a decoded token's K/V are computed once, in the forward after the step
that decoded it (with its decoded identity as input), and read from the cache
from then on; masked tokens are always fed; every ``cache_reloading_step``-th step
is a full forward that recomputes every position.

* LLaDA, per block (the cache restarts at each block): steps 0 and 1 of the block
  are full forwards; a later step feeds the positions that were masked at the
  previous forward (the still masked ones and those the previous step decoded).
* Dream, over the whole canvas: position j's hidden row gives position j + 1's
  logits, so j may be cached once token j + 1 is decoded (the last position once
  its own token is; the prompt counts as decoded); the first step is a full
  forward, a later one feeds the positions that were not cacheable at the
  previous forward.

Prefill (Dream): the first forward is full; every later one feeds the last prompt
position and the canvas (the prompt's K/V are never refreshed).

PD (Dream): Decode, except that a refresh step feeds everything but the prompt
(up to its last position): the prompt's K/V come from the first forward only.

Greedy (LLaDA, random remasking): the decoding order of each block is drawn at
its start (one random number per position, descending), so the positions a step
decodes are known before its forward. Every ``cache_reloading_step``-th step of a
block (the first included) is a full forward; any other step feeds the positions
the previous step decoded, those this step decodes, and a window of masked
neighbours of each of the latter.
"""

from __future__ import annotations

import torch

from vllm_dare.reference.cached_generation import (
    dream_generate_with_cache,
    llada_generate_with_cache,
)
from vllm_dare.reference.generation import _block_schedule
from vllm_dare.reference.modeling import ReferenceDLLM


def llada_generate_dkv_decode(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    cache_reloading_step: int = 8,
    **decoding,
) -> tuple[list[int], dict]:
    """``decoding``: ``remasking``, ``temperature``, ``generator``. Returns the
    canvas and ``{"forwards", "computed_rows"}``."""
    L = len(prompt) + gen_length
    masked_at_previous_forward = [None]

    def feed(x, start, end, i):
        before, masked_at_previous_forward[0] = masked_at_previous_forward[0], x == mask_id
        if i <= 1 or i % cache_reloading_step == 0:
            return torch.arange(L), None
        return before.nonzero().squeeze(-1), None

    return llada_generate_with_cache(model, prompt, mask_id, gen_length, steps,
                                     block_length, feed, **decoding)


def _dream_cacheable(P: int, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    decoded = x != mask_id
    decoded[:P] = True
    return torch.cat([decoded[1:], decoded[-1:]])


def dream_generate_dkv(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    cache: str,
    cache_reloading_step: int = 4,
    alg: str = "maskgit_plus",
) -> tuple[list[int], dict]:
    """``cache``: ``"decode"``, ``"prefill"`` or ``"pd"``; greedy. Returns the
    canvas and ``{"forwards", "computed_rows"}``."""
    assert cache in ("decode", "prefill", "pd")
    P = len(prompt)
    L = P + max_new_tokens
    cacheable_before = [None]

    def feed(x, i):
        before, cacheable_before[0] = cacheable_before[0], _dream_cacheable(P, x, mask_id)
        if cache == "prefill":
            return torch.arange(L) if before is None else torch.arange(P - 1, L)
        if before is None:
            return torch.arange(L)
        if i % cache_reloading_step == 0:
            return torch.arange(P - 1 if cache == "pd" else 0, L)
        return (~before).nonzero().squeeze(-1)

    return dream_generate_with_cache(model, prompt, mask_id, max_new_tokens, steps, feed,
                                     alg=alg)


@torch.no_grad()
def llada_generate_dkv_greedy(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    cache_reloading_step: int = 2,
    window_size: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[list[int], dict]:
    """Greedy tokens (argmax); ``generator`` draws each block's order. Returns the
    canvas and ``{"forwards", "computed_rows"}``."""
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    kv_cache = model.new_kv_cache(L)
    steps_per_block = steps // (gen_length // block_length)
    forwards = rows = 0
    for b in range(gen_length // block_length):
        start = P + b * block_length
        draws = torch.rand(block_length, dtype=torch.float64, generator=generator)
        order = start + torch.sort(draws, descending=True).indices
        counts = _block_schedule(block_length, steps_per_block)
        taken = 0
        decoded_last = torch.zeros(0, dtype=torch.long)
        masked_last = None
        for i in range(steps_per_block):
            if counts[i] == 0:
                continue
            this_step = order[taken:taken + counts[i]]
            masked_now = x == mask_id
            if masked_last is None or i % cache_reloading_step == 0:
                fed = torch.arange(L)
            else:
                chosen = set(this_step.tolist()) | set(decoded_last.tolist())
                for p in this_step.tolist():  # the window around each, in order
                    left, right, found, go_left = p - 1, p + 1, 0, True
                    while found < window_size and (left >= 0 or right < L):
                        q = left if go_left else right
                        if 0 <= q < L and bool(masked_last[q]) and q not in chosen:
                            chosen.add(q)
                            found += 1
                        if go_left:
                            left -= 1
                        else:
                            right += 1
                        go_left = not go_left
                fed = torch.tensor(sorted(chosen))
            hidden = model.cached_hidden_states(x, fed, kv_cache)
            forwards += 1
            rows += fed.numel() * model.spec.num_layers
            logits = model.logits_of(hidden[torch.searchsorted(fed, this_step)])
            x[this_step] = logits.argmax(dim=-1)
            decoded_last, masked_last = this_step, masked_now
            taken += counts[i]
    return x[P:].tolist(), {"forwards": forwards, "computed_rows": rows}
