"""Reference of Fast-dLLM's PrefixCache and DualCache (arXiv 2505.22618) for
LLaDA's semi-autoregressive generation, one sequence at a time, dense.

Per block of the canvas:

1. The block's first step runs a full forward over prompt + canvas. It writes
   every position's K/V into the cache and its logits decode, as any step.
2. Each later step of the block feeds
   * PrefixCache: the block and everything after it (the masked suffix);
   * DualCache: the block only;
   the fed tokens attend to the cached K/V of the positions not fed (as the
   block-start forward left them) and to their own fresh K/V.
3. The step decodes from the logits of the block's positions exactly as LLaDA's
   low-confidence / random remasking step does (``generation.llada_generate``).

A step whose schedule unmasks nothing changes nothing and is left out. Classifier-
free guidance runs the same forwards for the unconditional sequence (prompt
replaced by [MASK]) against its own cache.
"""

from __future__ import annotations

import torch

from vllm_dare.reference.generation import _block_schedule
from vllm_dare.reference.modeling import ReferenceDLLM

CACHES = ("prefix", "dual")


@torch.no_grad()
def llada_generate_cached(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    cache: str,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], dict]:
    """Returns the canvas and ``{"forwards", "computed_rows"}`` (token-layer rows
    the forwards fed; the engine's figures add its prompt-only pass)."""
    assert cache in CACHES and gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    caches = [model.new_kv_cache(L) for _ in range(2 if cfg_scale > 0 else 1)]
    figures = {"forwards": 0, "computed_rows": 0}

    def block_logits(fed: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits of the block's positions from a forward feeding ``fed``."""
        sequences = [x]
        if cfg_scale > 0:
            uncond = x.clone()
            uncond[:P] = mask_id
            sequences.append(uncond)
        logits = []
        for seq, kv in zip(sequences, caches):
            hidden = model.cached_hidden_states(seq, fed, kv)
            rows = torch.searchsorted(fed, torch.arange(start, end))
            logits.append(model.logits_of(hidden[rows]))
            figures["forwards"] += 1
            figures["computed_rows"] += fed.numel() * model.spec.num_layers
        if cfg_scale > 0:
            cond, uncond = logits
            return uncond + (cfg_scale + 1) * (cond - uncond)
        return logits[0]

    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = _block_schedule(block_length, steps_per_block)
        for j in range(steps_per_block):
            if counts[j] == 0:
                continue
            if j == 0:
                fed = torch.arange(L)  # block start: refresh every position
            elif cache == "prefix":
                fed = torch.arange(start, L)
            else:
                fed = torch.arange(start, end)
            logits = block_logits(fed, start, end)  # rows: positions start..end-1
            if temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                # Gumbel noise drawn for the whole canvas, as the exact reference.
                lg = logits.to(torch.float64)
                noise = torch.rand((gen_length, lg.shape[-1]), dtype=torch.float64,
                                   generator=generator)[start - P : end - P]
                x0 = (lg.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = p.gather(-1, x0[:, None]).squeeze(-1)
            else:
                x0_p = torch.rand(gen_length, dtype=torch.float64,
                                  generator=generator)[start - P : end - P]
            is_mask = x[start:end] == mask_id
            confidence = torch.where(is_mask, x0_p, float("-inf"))
            chosen = torch.topk(confidence, counts[j]).indices
            x[start + chosen] = x0[chosen]
    return x[P:].tolist(), figures
