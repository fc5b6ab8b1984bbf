"""Reference of DARE (activation reuse across denoising steps, arXiv 2605.08134)
with reuse on: the dense reference model with per-layer caches of K, V, the
attention output O and the reference query Q_ref kept across a request's
forwards, and the reuse rule written from its definition (``docs/dare.md``),
one request at a time. Through vLLM, ``--attention-backend dare`` equals it
token for token and in its reuse counts.

Per forward and layer, for each token p fed (every position: DARE runs on the
whole sequence):

* q_p is its query (RoPE applied) and ``delta_p = ||q_p - Q_ref[p]|| /
  (||Q_ref[p]|| + 1e-6)`` over all its heads (``per_head``: the largest per-head
  delta);
* unless p is forced, ``delta_p <= tau_kv`` reuses K[p], V[p] (mode ``kv`` or
  ``kv+o``, ``tau_kv > 0``) and ``delta_p <= tau_o`` reuses O[p] (mode ``o`` or
  ``kv+o``, ``tau_o > 0``); everything else is recomputed and written to the cache;
* attention reads the cache (reused rows as they were, recomputed rows fresh);
* Q_ref[p] := q_p where p's K/V were recomputed (requests that reuse K/V), or
  else where its O was.

Forced rows (recomputed whatever delta says):

* every row of the request's first two forwards: vLLM's pass over the prompt
  alone (no logits) and the first forward over the whole sequence;
* every row of every ``refresh_interval``-th forward (counted from the prompt
  pass, which is forward 0) and, with ``refresh_at_block_start``, of the first
  forward of each LLaDA block;
* the tokens whose input id changed since the previous forward (just unmasked);
* with ``recompute_candidates``, the rows whose logits decide the step (LLaDA:
  the current block's masked positions; Dream: every masked position, whose
  logits come from the row before it), or with ``candidate_limit`` > 0 only that
  many of them, those the previous step ranked most confident first (positions
  it did not rank last, ties to the lower position).

A step that unmasks nothing runs no forward (in exact generation it changes
nothing; here it would also move the caches), as in the engine.
"""

from __future__ import annotations

import torch

from vllm_dare.cache_policies.dare_reuse import DareSettings
from vllm_dare.reference.cached_generation import _llada_choices
from vllm_dare.reference.generation import _block_schedule, _sample_tokens
from vllm_dare.reference.modeling import ReferenceDLLM, rms_norm, rope_tables

EPS = 1e-6


class DareRequestState:
    """One request's DARE caches and counts across its forwards."""

    def __init__(self, model: ReferenceDLLM, settings: DareSettings, length: int):
        s = model.spec
        self.model = model
        self.settings = settings
        dtype = model.dtype

        def rows(heads: int) -> list[torch.Tensor]:
            return [torch.zeros(heads, length, s.head_dim, dtype=dtype)
                    for _ in range(s.num_layers)]

        self.K, self.V = rows(s.num_kv_heads), rows(s.num_kv_heads)
        self.Q_ref = rows(s.num_heads)
        self.O = [torch.zeros(length, s.hidden_size, dtype=dtype) for _ in range(s.num_layers)]
        self.forwards = 0
        self.previous_ids: torch.Tensor | None = None
        # Token-layer rows; rows reused; rows forced by rule (requests that reuse);
        # rows the predictor refused (not forced, reuse on, delta above tau).
        self.counts = {"token_layers": 0, "kv_reused": 0, "o_reused": 0, "forced_rows": 0,
                       "kv_refused": 0, "o_refused": 0}

    def forced_rows(self, ids: torch.Tensor, block_start: bool,
                    candidate_rows: torch.Tensor) -> torch.Tensor:
        """bool [T]: the rows of this forward over the whole sequence ``ids`` that
        are recomputed whatever their query delta (``candidate_rows``: the rows whose
        logits decide the step)."""
        s = self.settings
        every = torch.ones(ids.shape[0], dtype=torch.bool)
        prev = self.previous_ids
        if prev is None or prev.shape != ids.shape:
            return every  # the first forward over the whole sequence
        if s.refresh_interval and self.forwards % s.refresh_interval == 0:
            return every
        if s.refresh_at_block_start and block_start:
            return every
        forced = ids != prev
        if s.recompute_candidates:
            forced[candidate_rows] = True
        return forced

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """A forward over ``ids`` (positions 0 .. T-1, T at most the request's
        length) with the rows ``forced`` recomputed; returns the final-norm hidden
        states ``[T, hidden]`` and adds to the counts."""
        model, spec, s = self.model, self.model.spec, self.settings
        T = ids.shape[0]
        cos, sin = rope_tables(torch.arange(T), spec.head_dim, spec.rope_theta)
        x = model.embed[ids]
        for i, layer in enumerate(model.layers):
            K, V, Q_ref, O = self.K[i][:, :T], self.V[i][:, :T], self.Q_ref[i][:, :T], self.O[i][:T]
            h = rms_norm(x, layer["attn_norm"], spec.rms_norm_eps)
            q, k, v = model._qkv(h, layer, cos, sin)  # [heads, T, head_dim]
            change = (q.float() - Q_ref.float()).pow(2).sum(-1)  # [heads, T]
            size = Q_ref.float().pow(2).sum(-1)
            if s.per_head:
                delta = (change.sqrt() / (size.sqrt() + EPS)).amax(dim=0)
            else:
                delta = change.sum(0).sqrt() / (size.sum(0).sqrt() + EPS)
            reuse_kv = ~forced & (delta <= s.tau_kv) if s.reuses_kv else torch.zeros_like(forced)
            reuse_o = ~forced & (delta <= s.tau_o) if s.reuses_o else torch.zeros_like(forced)
            K[:, ~reuse_kv] = k[:, ~reuse_kv]
            V[:, ~reuse_kv] = v[:, ~reuse_kv]
            fresh_o = model._attend(q, K, V, layer)
            O[~reuse_o] = fresh_o[~reuse_o]
            recomputed = ~reuse_kv if s.reuses_kv else ~reuse_o
            Q_ref[:, recomputed] = q[:, recomputed]
            x = model._mlp(x + O, layer)
            self.counts["token_layers"] += T
            self.counts["kv_reused"] += int(reuse_kv.sum())
            self.counts["o_reused"] += int(reuse_o.sum())
            if s.reuses_kv or s.reuses_o:
                self.counts["forced_rows"] += int(forced.sum())
            if s.reuses_kv:
                self.counts["kv_refused"] += int((~forced & ~reuse_kv).sum())
            if s.reuses_o:
                self.counts["o_refused"] += int((~forced & ~reuse_o).sum())
        self.forwards += 1
        self.previous_ids = ids.clone()
        return rms_norm(x, model.final_norm, spec.rms_norm_eps)

    def prompt_pass(self, prompt: torch.Tensor) -> None:
        """vLLM's first forward of a request: the prompt alone, every row computed."""
        self.forward(prompt, torch.ones(prompt.shape[0], dtype=torch.bool))


def _candidates(eligible: torch.Tensor, last_confidence: torch.Tensor | None,
                limit: int) -> torch.Tensor:
    """The canvas positions (of ``eligible``, ascending) whose rows are recomputed
    as candidates: all, or the ``limit`` the previous step ranked highest."""
    if limit <= 0 or last_confidence is None or eligible.numel() <= limit:
        return eligible
    ranked = sorted(eligible.tolist(), key=lambda p: (-float(last_confidence[p]), p))
    return torch.tensor(sorted(ranked[:limit]), dtype=torch.long)


@torch.no_grad()
def llada_generate_dare(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    settings: DareSettings,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], dict]:
    """LLaDA's semi-autoregressive generation (``generation.llada_generate``, no
    guidance) with DARE. Returns the canvas and the counts (``DareRequestState.counts``)."""
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * gen_length, dtype=torch.long)
    state = DareRequestState(model, settings, P + gen_length)
    state.prompt_pass(x[:P])
    last_confidence = None  # per canvas position, the previous step's ranking
    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        counts = _block_schedule(block_length, steps_per_block)
        for j in range(steps_per_block):
            if counts[j] == 0:
                continue
            eligible = torch.arange(start, end)[x[start:end] == mask_id]
            candidates = _candidates(eligible - P, last_confidence, settings.candidate_limit)
            forced = state.forced_rows(x, j == 0, P + candidates)
            hidden = state.forward(x, forced)
            logits = model.logits_of(hidden[eligible])
            x0, confidence = _llada_choices(logits, eligible - P, P, gen_length, remasking,
                                            temperature, generator)
            last_confidence = torch.full((gen_length,), float("-inf"), dtype=torch.float64)
            last_confidence[eligible - P] = confidence
            chosen = torch.topk(confidence, counts[j]).indices
            x[eligible[chosen]] = x0[chosen]
    return x[P:].tolist(), dict(state.counts)


@torch.no_grad()
def dream_generate_dare(
    model: ReferenceDLLM,
    prompt: list[int],
    mask_id: int,
    max_new_tokens: int,
    steps: int,
    settings: DareSettings,
    alg: str = "origin",
    eps: float = 1e-3,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[int], dict]:
    """Dream's ``diffusion_generate`` (``generation.dream_generate``, ``alg_temp``
    unset) with DARE; position p's logits come from the hidden row of p - 1.
    Returns the canvas and the counts (``DareRequestState.counts``)."""
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * max_new_tokens, dtype=torch.long)
    state = DareRequestState(model, settings, P + max_new_tokens)
    state.prompt_pass(x[:P])
    timesteps = torch.linspace(1, eps, steps + 1)
    last_confidence = None
    for i in range(steps):
        mask_index = x == mask_id
        num_mask = int(mask_index.sum())
        if num_mask == 0:
            break
        t, s = timesteps[i], timesteps[i + 1]
        n = int(torch.tensor(float(num_mask)) * (1 - s / t)) if i < steps - 1 else num_mask
        if alg != "origin" and n == 0:
            continue
        positions = mask_index.nonzero().squeeze(-1)
        candidates = _candidates(positions - P, last_confidence, settings.candidate_limit)
        forced = state.forced_rows(x, False, P + candidates - 1)
        hidden = state.forward(x, forced)
        logits = model.logits_of(hidden[positions - 1])
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full((num_mask,), mask_id, dtype=torch.long)
            transfer = torch.rand(x0.shape, generator=generator) < p_transfer
            if transfer.any():
                _, x0[transfer] = _sample_tokens(logits[transfer], temperature, top_p, top_k,
                                                 alg, generator)
            x[positions] = x0
            continue
        confidence, x0 = _sample_tokens(logits, temperature, top_p, top_k, alg, generator)
        last_confidence = torch.full((max_new_tokens,), float("-inf"), dtype=confidence.dtype)
        last_confidence[positions - P] = confidence
        chosen = torch.topk(confidence, n).indices
        x[positions[chosen]] = x0[chosen]
    return x[P:].tolist(), dict(state.counts)
