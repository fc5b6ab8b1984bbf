"""Reference of FreeCache (FlashDLM, arXiv 2505.21467), one sequence at a time,
dense.

The first forward computes every position (with a sliding window: the prompt and
the window). Every later step feeds the current block and everything after it
(with a window of W: the W canvas positions from the block's start, and nothing
beyond them is attended); the prompt's and the finished blocks' K/V stay as their
last forward left them. Dream has no blocks: its current block starts at the first
masked position, and the position before it is fed too (Dream reads a position's
logits from the hidden row before it).

Decoding within a step is the model's own (LLaDA low-confidence remasking; Dream's
confidence algorithms, greedy). A step that would unmask nothing is left out, as
the engine does.
"""

from __future__ import annotations

import torch

from vllm_dare.reference.generation import _block_schedule
from vllm_dare.reference.modeling import ReferenceDLLM


@torch.no_grad()
def llada_generate_freecache(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    window: int | None = None,
) -> tuple[list[int], dict]:
    """Greedy, low-confidence remasking. Returns the canvas and
    ``{"forwards", "computed_rows"}``."""
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    kv_cache = model.new_kv_cache(L)
    figures = {"forwards": 0, "computed_rows": 0}
    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        stop = L if window is None else min(L, start + window)
        counts = _block_schedule(block_length, steps_per_block)
        for j in range(steps_per_block):
            if counts[j] == 0:
                continue
            fed = torch.arange(0 if figures["forwards"] == 0 else start, stop)
            hidden = model.cached_hidden_states(x, fed, kv_cache, attend=stop)
            figures["forwards"] += 1
            figures["computed_rows"] += fed.numel() * model.spec.num_layers
            logits = model.logits_of(hidden[torch.searchsorted(fed, torch.arange(start, end))])
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            confidence = p.gather(-1, x0[:, None]).squeeze(-1)
            confidence = torch.where(x[start:end] == mask_id, confidence, float("-inf"))
            chosen = torch.topk(confidence, counts[j]).indices
            x[start + chosen] = x0[chosen]
    return x[P:].tolist(), figures


@torch.no_grad()
def dream_generate_freecache(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    alg: str = "maskgit_plus",
    eps: float = 1e-3,
) -> tuple[list[int], dict]:
    """Dream's ``diffusion_generate`` (greedy, not ``origin``) with FreeCache.
    Returns the canvas and ``{"forwards", "computed_rows"}``."""
    assert alg != "origin"
    P = len(prompt)
    L = P + max_new_tokens
    x = torch.tensor(prompt + [mask_id] * max_new_tokens, dtype=torch.long)
    kv_cache = model.new_kv_cache(L)
    timesteps = torch.linspace(1, eps, steps + 1)
    figures = {"forwards": 0, "computed_rows": 0}
    for i in range(steps):
        mask_index = x == mask_id
        num_mask = int(mask_index.sum())
        if num_mask == 0:
            break
        t, s = timesteps[i], timesteps[i + 1]
        n = int(torch.tensor(float(num_mask)) * (1 - s / t)) if i < steps - 1 else num_mask
        if n == 0:
            continue
        positions = mask_index.nonzero().squeeze(-1)
        first_fed = 0 if figures["forwards"] == 0 else int(positions[0]) - 1
        fed = torch.arange(first_fed, L)
        hidden = model.cached_hidden_states(x, fed, kv_cache)
        figures["forwards"] += 1
        figures["computed_rows"] += fed.numel() * model.spec.num_layers
        logits = model.logits_of(hidden[torch.searchsorted(fed, positions - 1)])
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
