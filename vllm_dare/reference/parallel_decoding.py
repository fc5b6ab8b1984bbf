"""Reference of Fast-dLLM's parallel decoding (arXiv 2505.22618) for LLaDA's
semi-autoregressive generation, one sequence at a time, dense.

Within the current block, every step ranks the block's masked positions by the
confidence of their predicted token (float64 softmax probability; with random
remasking a random number) and commits

* ``threshold``: the most confident one, and every other one whose confidence
  is at least ``threshold`` (default 0.9);
* ``factor``: the most confident one, and the n-th most confident (n = 2, 3,
  ...) while its confidence c_n >= 1 - factor / (n + 1) (default factor 1).

A block takes as many steps (forwards) as it needs; the next block starts when
no position of the current one is masked. The step count of the official
schedule is not used.
"""

from __future__ import annotations

import torch

from vllm_dare.reference.generation import LogitsFn

RULES = ("threshold", "factor")


def accepted(ranked_confidence: list[float], rule: str, threshold: float = 0.9,
             factor: float = 1.0) -> int:
    """How many of the candidates, ranked by confidence (descending), a step
    commits."""
    assert rule in RULES
    count = 1
    for n, confidence in enumerate(ranked_confidence[1:], start=2):
        bound = threshold if rule == "threshold" else 1 - factor / (n + 1)
        if confidence < bound:
            break
        count += 1
    return count


@torch.no_grad()
def llada_generate_parallel(
    model: LogitsFn,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    block_length: int,
    rule: str = "threshold",
    threshold: float = 0.9,
    factor: float = 1.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
) -> tuple[list[int], int]:
    """Greedy LLaDA generation with parallel decoding; returns the canvas and the
    number of forwards (each guided step counts as two: the request and its
    unconditional twin)."""
    assert gen_length % block_length == 0
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    forwards = 0
    for b in range(gen_length // block_length):
        start, end = P + b * block_length, P + (b + 1) * block_length
        while bool((x[start:end] == mask_id).any()):
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[:P] = mask_id
                cond_logits, uncond_logits = model(x), model(uncond)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
                forwards += 2
            else:
                logits = model(x)
                forwards += 1
            masked = torch.arange(start, end)[x[start:end] == mask_id]
            x0 = logits[masked].argmax(dim=-1)
            if remasking == "low_confidence":
                probs = torch.softmax(logits[masked].to(torch.float64), dim=-1)
                confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
            else:
                raise ValueError("the greedy reference ranks by model confidence")
            ranked = torch.topk(confidence, masked.numel())
            k = accepted(ranked.values.tolist(), rule, threshold, factor)
            chosen = ranked.indices[:k]
            x[masked[chosen]] = x0[chosen]
    return x[P:].tolist(), forwards
