"""DARE with reuse on, through vLLM, against its dense reference
(``reference/dare_generation.py``): the same tokens and the same per-request
reuse counts, requests with different DARE settings batched together, LLaDA and
Dream, with the PyTorch ops the CPU build runs and with the Triton kernels
(interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from vllm_dare.cache_policies.dare_reuse import DareSettings
from vllm_dare.reference import load_reference_model
from vllm_dare.reference.dare_generation import dream_generate_dare, llada_generate_dare

from engine_steps import PROMPTS

COUNTS = ("token_layers", "kv_reused", "o_reused", "forced_rows", "kv_refused", "o_refused")
ENGINE = {"mode": "kv+o", "tau_kv": 0.05, "tau_o": 0.05}

# One batch: per request, its DARE overrides. Together they cover every mode, both
# thresholds, refreshes, candidates with and without a limit.
LLADA_REQUESTS = [
    {},
    {"dare_mode": "kv", "dare_tau_kv": 0.2},
    {"dare_mode": "o", "dare_tau_o": 0.2},
    {"dare_tau_kv": 0.3, "dare_tau_o": 0.1, "dare_refresh_interval": 3},
    {"dare_tau_kv": 0.5, "dare_tau_o": 0.5, "dare_recompute_candidates": True},
    {"dare_tau_kv": 0.5, "dare_tau_o": 0.5, "dare_recompute_candidates": True,
     "dare_candidate_limit": 2},
    # Above any delta: only the forced-row rules recompute.
    {"dare_tau_kv": 1e6, "dare_tau_o": 1e6},
]
DREAM_REQUESTS = [
    ({"dllm_alg": "entropy"}, {}),
    ({"dllm_alg": "maskgit_plus"}, {"dare_tau_kv": 0.3, "dare_tau_o": 0.3,
                                    "dare_recompute_candidates": True,
                                    "dare_candidate_limit": 3}),
    ({"dllm_alg": "topk_margin"}, {"dare_mode": "o", "dare_tau_o": 0.3,
                                   "dare_refresh_interval": 4}),
    ({"dllm_alg": "origin"}, {"dare_mode": "kv", "dare_tau_kv": 0.3}),
    ({"dllm_alg": "entropy"}, {"dare_tau_kv": 1e6, "dare_tau_o": 1e6,
                               "dare_recompute_candidates": True}),
]


def _settings(engine: dict, overrides: dict) -> DareSettings:
    return DareSettings.from_engine_config(engine).for_request(overrides)


def _prompts(llm, n):
    tok = llm.get_tokenizer()
    return [tok.encode(PROMPTS[k % len(PROMPTS)]) for k in range(n)]


def _check(outs, wants):
    reused = 0
    for k, (out, (tokens, counts)) in enumerate(zip(outs, wants)):
        got = out.kv_transfer_params["dare"]
        assert list(out.outputs[0].token_ids) == tokens, k
        assert {key: got[key] for key in COUNTS} == counts, k
        reused += counts["kv_reused"] + counts["o_reused"]
    assert reused > 0  # the settings really reuse


def _llada(engines, tiny_llada, per_head=False):
    llm = engines.get(tiny_llada, attention_backend="dare",
                      additional_config={"dare": {**ENGINE, "per_head": per_head}})
    ref = load_reference_model(tiny_llada)
    ids = _prompts(llm, len(LLADA_REQUESTS))
    base = {"dllm_steps": 16, "dllm_block_length": 8}
    params = [SamplingParams(max_tokens=16, ignore_eos=True, extra_args={**base, **o})
              for o in LLADA_REQUESTS]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    wants = [llada_generate_dare(ref, prompt, ref.spec.mask_token_id, 16, 16, 8,
                                 _settings({**ENGINE, "per_head": per_head}, o))
             for prompt, o in zip(ids, LLADA_REQUESTS)]
    return outs, wants


def _dream(engines, tiny_dream):
    llm = engines.get(tiny_dream, attention_backend="dare", additional_config={"dare": ENGINE})
    ref = load_reference_model(tiny_dream)
    ids = _prompts(llm, len(DREAM_REQUESTS))
    params = [SamplingParams(max_tokens=16, ignore_eos=True,
                             extra_args={"dllm_steps": 12, "dllm_seed": 7, **alg, **o})
              for alg, o in DREAM_REQUESTS]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    wants = [dream_generate_dare(ref, prompt, ref.spec.mask_token_id, 16, 12,
                                 _settings(ENGINE, o), alg=alg["dllm_alg"],
                                 generator=torch.Generator().manual_seed(7))
             for prompt, (alg, o) in zip(ids, DREAM_REQUESTS)]
    return outs, wants


def test_llada_batched_equals_reference(engines, tiny_llada):
    _check(*_llada(engines, tiny_llada))


def test_llada_per_head_delta_equals_reference(engines, tiny_llada):
    _check(*_llada(engines, tiny_llada, per_head=True))


def test_dream_batched_equals_reference(engines, tiny_dream):
    _check(*_dream(engines, tiny_dream))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_triton_kernels_equal_reference(engines, tiny_llada, tiny_dream, family, monkeypatch):
    engines.close()
    monkeypatch.setenv("VLLM_DARE_KERNELS", "triton")
    try:
        if family == "llada":
            outs, wants = _llada(engines, tiny_llada)
        else:
            outs, wants = _dream(engines, tiny_dream)
        from vllm_dare.attention_backends import triton_dare_kernels

        model = engines.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        assert model.dare_runtime.ops is triton_dare_kernels
        _check(outs, wants)
    finally:
        engines.close()
