"""Sampling through vLLM equals the reference generation under a seed
(``dllm_seed``; the reference draws from a ``torch.Generator`` seeded the same):
LLaDA's Gumbel-max temperature sampling and ``random`` remasking, Dream's
``origin`` (the reveal draws), temperature, top-p, top-k and ``alg_temp``, for
requests alone and batched with others of different settings."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from vllm_dare.reference import dream_generate, llada_generate, load_reference_model

from engine_steps import PROMPTS

LLADA = [  # (request knobs, reference keywords)
    ({"dllm_temperature": 0.7}, {"temperature": 0.7}),
    ({"dllm_remasking": "random"}, {"remasking": "random"}),
    ({"dllm_temperature": 1.0, "dllm_remasking": "random"},
     {"temperature": 1.0, "remasking": "random"}),
    ({"dllm_temperature": 0.5, "dllm_cfg_scale": 1.0}, {"temperature": 0.5, "cfg_scale": 1.0}),
]
DREAM = [
    ({"dllm_alg": "origin"}, {"alg": "origin"}),
    ({"dllm_alg": "origin", "dllm_temperature": 0.8, "dllm_top_p": 0.9},
     {"alg": "origin", "temperature": 0.8, "top_p": 0.9}),
    ({"dllm_alg": "maskgit_plus", "dllm_temperature": 0.7, "dllm_top_k": 5},
     {"alg": "maskgit_plus", "temperature": 0.7, "top_k": 5}),
    ({"dllm_alg": "entropy", "dllm_temperature": 0.5, "dllm_top_p": 0.95, "dllm_top_k": 20},
     {"alg": "entropy", "temperature": 0.5, "top_p": 0.95, "top_k": 20}),
    ({"dllm_alg": "topk_margin", "dllm_alg_temp": 0.5}, {"alg": "topk_margin", "alg_temp": 0.5}),
]


def _generate(llm, ids, knobs, seeds, base):
    params = [SamplingParams(max_tokens=16, ignore_eos=True,
                             extra_args={**base, **k, "dllm_seed": s})
              for k, s in zip(knobs, seeds)]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _check(llm, path, cases, base, reference):
    ref = load_reference_model(path)
    tok = llm.get_tokenizer()
    ids = [tok.encode(PROMPTS[k % len(PROMPTS)]) for k in range(len(cases))]
    seeds = [11 + k for k in range(len(cases))]
    wants = [reference(ref, prompt, kw, torch.Generator().manual_seed(seed))
             for prompt, (_, kw), seed in zip(ids, cases, seeds)]
    batched = _generate(llm, ids, [k for k, _ in cases], seeds, base)
    for k, (got, want) in enumerate(zip(batched, wants)):
        assert got == want, ("batched", k)
    alone = _generate(llm, ids[:1], [cases[0][0]], seeds[:1], base)
    assert alone[0] == wants[0]
    # The seed matters: another one gives other tokens.
    assert _generate(llm, ids[:1], [cases[0][0]], [999], base)[0] != wants[0]


@pytest.mark.parametrize("first", range(len(LLADA)))
def test_llada_sampling_equals_reference(llada_engine, tiny_llada, first):
    """Each case leads once (it is then also run alone)."""
    def reference(ref, prompt, kw, generator):
        return llada_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 16, 8,
                              generator=generator, **kw)

    cases = LLADA[first:] + LLADA[:first]
    _check(llada_engine(), tiny_llada, cases, {"dllm_steps": 16, "dllm_block_length": 8},
           reference)


@pytest.mark.parametrize("first", range(len(DREAM)))
def test_dream_sampling_equals_reference(dream_engine, tiny_dream, first):
    """Each case leads once (it is then also run alone)."""
    def reference(ref, prompt, kw, generator):
        return dream_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 12,
                              generator=generator, **kw)

    cases = DREAM[first:] + DREAM[:first]
    _check(dream_engine(), tiny_dream, cases, {"dllm_steps": 12}, reference)
