"""The generation loops of the cache policies' references: LLaDA's and Dream's
official steps, where each forward feeds only the positions a method's feeding
rule picks and the rest is read from a dense per-layer K/V cache
(``ReferenceDLLM.cached_hidden_states``). Each method's module
(``fast_dllm_cache``, ``dkv_cache``, ``freecache``) is its feeding rule.

A step that would unmask nothing (a LLaDA step with a count of 0, a Dream step
whose transfer count truncates to 0) is left out, as the engine does; its index
still counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_dare.reference.generation import _block_schedule
from vllm_dare.reference.modeling import ReferenceDLLM
from vllm_dare.reference.parallel_decoding import accepted

# (x, block_start, block_end, step_in_block) -> (fed positions, attend length or
# None for the whole sequence); positions are of prompt + canvas.
LLaDAFeed = Callable[[torch.Tensor, int, int, int], tuple[torch.Tensor, int | None]]
# (x, step) -> fed positions (Dream attends to the whole sequence).
DreamFeed = Callable[[torch.Tensor, int], torch.Tensor]


class _Figures:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.forwards = 0
        self.computed_rows = 0

    def count(self, fed: torch.Tensor, sequences: int = 1) -> None:
        self.forwards += sequences
        self.computed_rows += sequences * fed.numel() * self.num_layers

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "computed_rows": self.computed_rows}


@torch.no_grad()
def llada_generate_with_cache(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    feed: LLaDAFeed,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    parallel: tuple[str, float, float] | None = None,
) -> tuple[list[int], dict]:
    """LLaDA's semi-autoregressive generation (``generation.llada_generate``) with
    cached forwards. Guidance runs the same forwards for the unconditional
    sequence against its own cache. ``parallel``: ``(rule, threshold, factor)``
    of parallel decoding (``parallel_decoding``): each step commits what the rule
    accepts, until the block is done. Returns the canvas and ``{"forwards",
    "computed_rows"}``."""
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    P = len(prompt)
    L = P + gen_length
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    caches = [model.new_kv_cache(L) for _ in range(2 if cfg_scale > 0 else 1)]
    figures = _Figures(model.spec.num_layers)
    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = _block_schedule(block_length, steps_per_block)
        j = -1
        while True:
            j += 1
            if parallel is None:
                if j == steps_per_block:
                    break
                if counts[j] == 0:
                    continue
            elif not bool((x[start:end] == mask_id).any()):
                break
            fed, attend = feed(x, start, end, j)
            eligible = torch.arange(start, end)[x[start:end] == mask_id]
            rows = torch.searchsorted(fed, eligible)
            sequences = [x]
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[:P] = mask_id
                sequences.append(uncond)
            logits = [model.logits_of(model.cached_hidden_states(seq, fed, kv, attend)[rows])
                      for seq, kv in zip(sequences, caches)]
            figures.count(fed, len(sequences))
            if cfg_scale > 0:
                cond, uncond_logits = logits
                logits = [uncond_logits + (cfg_scale + 1) * (cond - uncond_logits)]
            x0, confidence = _llada_choices(logits[0], eligible - P, P, gen_length,
                                            remasking, temperature, generator)
            if parallel is None:
                k = counts[j]
            else:
                ranked = torch.sort(confidence, descending=True).values.tolist()
                k = accepted(ranked, *parallel)
            chosen = torch.topk(confidence, k).indices
            x[eligible[chosen]] = x0[chosen]
    return x[P:].tolist(), figures.as_dict()


def _llada_choices(logits, canvas_positions, prompt_len, gen_length, remasking, temperature,
                   generator):
    """Token and confidence of each row, as LLaDA's step computes them (random
    draws are made for the whole sequence, prompt and canvas, as the exact
    reference makes them)."""
    rows = prompt_len + canvas_positions
    if temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        lg = logits.to(torch.float64)
        noise = torch.rand((prompt_len + gen_length, lg.shape[-1]), dtype=torch.float64,
                           generator=generator)[rows]
        x0 = (lg.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
    if remasking == "low_confidence":
        p = torch.softmax(logits.to(torch.float64), dim=-1)
        confidence = p.gather(-1, x0[:, None]).squeeze(-1)
    else:
        confidence = torch.rand(prompt_len + gen_length,
                                generator=generator)[rows].to(torch.float64)
    return x0, confidence


@torch.no_grad()
def dream_generate_with_cache(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    feed: DreamFeed,
    alg: str = "maskgit_plus",
    eps: float = 1e-3,
) -> tuple[list[int], dict]:
    """Dream's ``diffusion_generate`` (``generation.dream_generate``; greedy, a
    confidence algorithm, not ``origin``) with cached forwards. Position p's
    logits come from the hidden row of p - 1. Returns the canvas and
    ``{"forwards", "computed_rows"}``."""
    assert alg != "origin"
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * max_new_tokens, dtype=torch.long)
    kv_cache = model.new_kv_cache(P + max_new_tokens)
    timesteps = torch.linspace(1, eps, steps + 1)
    figures = _Figures(model.spec.num_layers)
    for i in range(steps):
        mask_index = x == mask_id
        num_mask = int(mask_index.sum())
        if num_mask == 0:
            break
        t, s = timesteps[i], timesteps[i + 1]
        n = int(torch.tensor(float(num_mask)) * (1 - s / t)) if i < steps - 1 else num_mask
        if n == 0:
            continue
        fed = feed(x, i)
        hidden = model.cached_hidden_states(x, fed, kv_cache)
        figures.count(fed)
        positions = mask_index.nonzero().squeeze(-1)
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
    return x[P:].tolist(), figures.as_dict()
