"""Reference of Fast-dLLM's block-wise Dream generation (arXiv 2505.22618), with
its PrefixCache / DualCache and parallel decoding, one sequence at a time, dense,
greedy.

Fast-dLLM runs Dream block by block (``dllm_block_length``), ``S = steps /
blocks`` steps per block:

1. The block's first step is a full forward over prompt + canvas (it refreshes
   every position's K/V). It decodes the block's first position only: inside a
   cached window, the shifted logit of a block's first position would come from
   that position itself, so it is decoded while the row before it is fresh.
2. Each later step j = 1 .. S-1 feeds (no cache) everything, (PrefixCache) the
   block and everything after it, or (DualCache) the block only, and ranks the
   block's masked positions by negative entropy of their predicted distribution;
   it commits ``int(masked * (1 - s / t))`` of them (``t, s`` =
   ``linspace(1, eps, S + 1)[j], [j + 1]``) and every remaining one at j = S-1.
   With parallel decoding it ranks them by the probability of their token and
   commits what the rule accepts (``parallel_decoding.accepted``), until the block
   is done.

Position p's logits are read from the hidden row of p - 1 (Dream's shift). A step
that would commit nothing runs no forward (the authors' loop runs it and changes
nothing).
"""

from __future__ import annotations

import torch

from vllm_dare.reference.modeling import ReferenceDLLM
from vllm_dare.reference.parallel_decoding import accepted

CACHES = ("none", "prefix", "dual")


@torch.no_grad()
def dream_generate_blockwise(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    cache: str = "none",
    parallel: tuple[str, float, float] | None = None,
    eps: float = 1e-3,
) -> tuple[list[int], dict]:
    """Returns the canvas and ``{"forwards", "computed_rows"}`` (the engine's
    figures add its prompt-only pass). ``parallel``: ``(rule, threshold,
    factor)``."""
    assert cache in CACHES and gen_length % block_length == 0
    num_blocks = gen_length // block_length
    S = steps // num_blocks
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    kv_cache = model.new_kv_cache(L)
    timesteps = torch.linspace(1, eps, S + 1)
    forwards = rows = 0

    def logits_at(positions: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        nonlocal forwards, rows
        hidden = model.cached_hidden_states(x, fed, kv_cache)
        forwards += 1
        rows += fed.numel() * model.spec.num_layers
        return model.logits_of(hidden[torch.searchsorted(fed, positions - 1)])

    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        # Step 0: full forward, decode the block's first position.
        first = logits_at(torch.tensor([start]), torch.arange(L))
        x[start] = first.argmax(dim=-1)[0]
        j = 1
        while bool((x[start:end] == mask_id).any()):
            masked = torch.arange(start, end)[x[start:end] == mask_id]
            if parallel is None:
                if j == S - 1:
                    n = masked.numel()
                else:
                    t, s = timesteps[j], timesteps[j + 1]
                    n = int(torch.tensor(float(masked.numel())) * (1 - s / t))
                if n == 0:
                    j += 1
                    continue
            if cache == "none":
                fed = torch.arange(L)
            elif cache == "prefix":
                fed = torch.arange(start, L)
            else:
                fed = torch.arange(start, end)
            logits = logits_at(masked, fed)
            probs = torch.softmax(logits.float(), dim=-1)
            x0 = probs.argmax(dim=-1)
            if parallel is None:
                neg_entropy = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
                chosen = torch.topk(neg_entropy, n).indices
            else:
                p64 = torch.softmax(logits.double(), dim=-1)
                confidence = p64.gather(-1, x0[:, None]).squeeze(-1)
                ranked = torch.topk(confidence, masked.numel())
                chosen = ranked.indices[: accepted(ranked.values.tolist(), *parallel)]
            x[masked[chosen]] = x0[chosen]
            j += 1
    return x[P:].tolist(), {"forwards": forwards, "computed_rows": rows}
