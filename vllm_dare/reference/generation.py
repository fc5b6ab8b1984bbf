"""Reference generation: the official LLaDA and Dream sampling loops.

Written from the published algorithms (LLaDA's ``generate``, Dream's
``diffusion_generate``), one sequence at a time, recomputing the whole sequence
(prompt + canvas) with a full forward at every step. ``model`` is any callable mapping token ids ``[T]`` to the
logits the algorithm reads ``[T, vocab]`` (for Dream: already shifted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _block_schedule(block_length: int, steps: int) -> list[int]:
    counts = [block_length // steps] * steps
    for j in range(block_length % steps):
        counts[j] += 1
    return counts


@torch.no_grad()
def llada_generate(
    model: LogitsFn,
    prompt: list[int],
    mask_id: int,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
) -> list[int]:
    """LLaDA's semi-autoregressive low-confidence remasking; returns the canvas."""
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)

    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = _block_schedule(int((x[start:end] == mask_id).sum()), steps_per_block)
        for j in range(steps_per_block):
            is_mask = x == mask_id
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[:P] = mask_id
                cond_logits, uncond_logits = model(x), model(uncond)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            else:
                logits = model(x)
            if temperature == 0:
                x0 = torch.argmax(logits, dim=-1)
            else:
                lg = logits.to(torch.float64)
                noise = torch.rand(lg.shape, dtype=torch.float64, generator=generator)
                x0 = torch.argmax(lg.exp() / (-torch.log(noise)) ** temperature, dim=-1)
            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            elif remasking == "random":
                # float32, as the official code draws it
                x0_p = torch.rand(x0.shape, generator=generator).to(torch.float64)
            else:
                raise ValueError(remasking)
            x0_p[end:] = float("-inf")
            # Prompt positions are never written, even if they hold the mask id.
            x0_p[:P] = float("-inf")
            x0 = torch.where(is_mask, x0, x)
            confidence = torch.where(is_mask, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype))
            if counts[j] > 0:
                _, idx = torch.topk(confidence, counts[j])
                x[idx] = x0[idx]
    return x[P:].tolist()


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _sample_tokens(logits, temperature, top_p, top_k, alg, generator):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(
    model: LogitsFn,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int = 512,
    alg: str = "origin",
    alg_temp: float | None = None,
    eps: float = 1e-3,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Dream's ``diffusion_generate``; returns the canvas."""
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * max_new_tokens, dtype=torch.long)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        mask_index[:P] = False
        logits = model(x).float()
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros(mask_logits.shape[0], dtype=torch.long) + mask_id
            transfer = torch.rand(x0.shape, generator=generator) < p_transfer
            if transfer.any():
                _, x0[transfer] = _sample_tokens(
                    mask_logits[transfer], temperature, top_p, top_k, alg, generator
                )
            x[mask_index] = x0
            continue
        confidence, x0 = _sample_tokens(mask_logits, temperature, top_p, top_k, alg, generator)
        num_mask = mask_index.sum() / 1.0
        n = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full_confidence = torch.full(x.shape, float("-inf"))
        full_confidence[mask_index] = confidence
        if n > 0:
            if alg_temp is None or alg_temp == 0:
                _, idx = torch.topk(full_confidence, n)
            else:
                weights = torch.softmax(full_confidence / alg_temp, dim=-1)
                idx = torch.multinomial(weights, n, generator=generator)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0.clone()
            x[idx] = x_[idx]
    return x[P:].tolist()
