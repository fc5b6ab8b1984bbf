"""Fast-dLLM parallel decoding (``dllm_parallel``) through vLLM equals its plain
PyTorch reference (``reference/parallel_decoding.py``) token for token and in
forwards, batched, alone and with the cache policies, guidance and DARE; bad
knobs are HTTP-400-style errors; the engine default comes from
``--additional-config``. Dream decodes in parallel within Fast-dLLM's block-wise
Dream generation (``reference/fast_dllm_dream.py``)."""

from __future__ import annotations

import pytest
from engine_steps import PROMPTS
import torch
from vllm import SamplingParams

from vllm_dare.reference import llada_generate, load_reference_model
from vllm_dare.reference.cached_generation import llada_generate_with_cache
from vllm_dare.reference.fast_dllm_dream import dream_generate_blockwise
from vllm_dare.reference.parallel_decoding import accepted, llada_generate_parallel


def _run(llm, ids, max_tokens, extras):
    if isinstance(extras, dict):
        extras = [extras] * len(ids)
    params = [SamplingParams(max_tokens=max_tokens, extra_args=e, ignore_eos=True)
              for e in extras]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outs],
            [o.kv_transfer_params["dllm"] for o in outs])


def test_the_rules_accept_what_the_paper_says():
    ranked = [0.99, 0.95, 0.91, 0.7, 0.95]
    assert accepted(ranked, "threshold", 0.9) == 3  # stops at the first below
    assert accepted([0.2, 0.1], "threshold", 0.9) == 1  # the first always
    # factor 1: the n-th needs 1 - 1/(n+1): 0.667 (n=2), 0.75 (n=3), 0.8 (n=4)
    assert accepted([0.5, 0.7, 0.76, 0.79], "factor", factor=1.0) == 3
    assert accepted([0.5, 0.6], "factor", factor=1.0) == 1
    assert accepted([0.5, 0.6], "factor", factor=1.5) == 2  # 1 - 1.5/3 = 0.5


@pytest.mark.parametrize("rule,value", [("threshold", 0.9), ("threshold", 0.05),
                                        ("factor", 1.0), ("factor", 4.0)])
def test_llada_parallel_decoding_matches_reference(llada_engine, tiny_llada, rule, value):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    knob = "dllm_threshold" if rule == "threshold" else "dllm_factor"
    extra = {"dllm_block_length": 8, "dllm_parallel": rule, knob: value}
    got, figures = _run(llm, ids, 32, extra)
    kwargs = {"threshold": value} if rule == "threshold" else {"factor": value}
    for prompt, tokens, fig in zip(ids, got, figures):
        want, forwards = llada_generate_parallel(ref.logits, prompt, ref.spec.mask_token_id,
                                                 32, 8, rule, **kwargs)
        assert tokens == want
        assert fig["forwards"] == forwards + 1  # + the engine's prompt-only pass
        assert fig["denoising_steps"] == forwards
    if (rule, value) in (("threshold", 0.05), ("factor", 4.0)):
        # Loose enough for this random model to commit several tokens per step.
        assert sum(f["denoising_steps"] for f in figures) < 32 * len(ids) * 0.75


def test_parallel_decoding_composes_in_one_batch(llada_engine, tiny_llada):
    """One batch: parallel alone, with DualCache, with PrefixCache, with guidance,
    and a request without it; each equals its reference."""
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    mask = ref.spec.mask_token_id
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    par = {"dllm_block_length": 8, "dllm_parallel": "threshold", "dllm_threshold": 0.05}
    extras = [par, {**par, "dllm_cache": "dual"}, {**par, "dllm_cache": "prefix"},
              {**par, "dllm_cfg_scale": 1.0}, {"dllm_block_length": 8, "dllm_steps": 16}]
    got, figures = _run(llm, ids, 16, extras)
    L = [len(p) + 16 for p in ids]

    def whole(k):
        return lambda x, start, end, j: (torch.arange(L[k]), None)

    def cached(k, cache):
        def feed(x, start, end, j):
            if j == 0:
                return torch.arange(L[k]), None
            return torch.arange(start, L[k] if cache == "prefix" else end), None
        return feed

    rule = ("threshold", 0.05, 1.0)
    want = [
        llada_generate_parallel(ref.logits, ids[0], mask, 16, 8, "threshold", 0.05)[0],
        llada_generate_with_cache(ref, ids[1], mask, 16, 16, 8, cached(1, "dual"),
                                  parallel=rule)[0],
        llada_generate_with_cache(ref, ids[2], mask, 16, 16, 8, cached(2, "prefix"),
                                  parallel=rule)[0],
        llada_generate_parallel(ref.logits, ids[3], mask, 16, 8, "threshold", 0.05,
                                cfg_scale=1.0)[0],
        llada_generate(ref.logits, ids[4], mask, 16, 16, 8),
    ]
    assert got == want
    # The cached reference with full forwards is the plain one.
    assert llada_generate_with_cache(ref, ids[0], mask, 16, 16, 8, whole(0),
                                     parallel=rule)[0] == want[0]
    assert figures[4]["forwards"] == 17


def test_parallel_decoding_composes_with_dare(engines, tiny_llada):
    """With nothing reused DARE leaves parallel decoding's tokens as the reference's;
    with reuse on it reuses K/V rows of the same forwards."""
    config = {"dare": {"mode": "kv+o", "tau_kv": 0.05, "tau_o": 0.05}}
    llm = engines.get(tiny_llada, attention_backend="dare", additional_config=config)
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:3]]
    extra = {"dllm_block_length": 8, "dllm_parallel": "factor", "dllm_factor": 4.0}
    params = SamplingParams(max_tokens=16, ignore_eos=True,
                            extra_args={**extra, "dare_tau_kv": 0.0, "dare_tau_o": 0.0})
    off = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in off] == [
        llada_generate_parallel(ref.logits, p, ref.spec.mask_token_id, 16, 8, "factor",
                                factor=4.0)[0] for p in ids]
    params = SamplingParams(max_tokens=16, ignore_eos=True, extra_args=extra)
    on = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    for out in on:
        dllm, dare = out.kv_transfer_params["dllm"], out.kv_transfer_params["dare"]
        assert len(out.outputs[0].token_ids) == 16
        assert dare["token_layers"] == dllm["computed_rows"]
        assert dare["kv_reused"] > 0


def test_engine_default_parallel_decoding_from_additional_config(engines, tiny_llada):
    llm = engines.get(tiny_llada, additional_config={"dllm_parallel": "threshold",
                                                     "dllm_threshold": 0.05})
    ref = load_reference_model(tiny_llada)
    mask = ref.spec.mask_token_id
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:3]]
    default, _ = _run(llm, ids, 16, {"dllm_block_length": 8})
    assert default == [llada_generate_parallel(ref.logits, p, mask, 16, 8, "threshold",
                                               0.05)[0] for p in ids]
    # Another rule does not inherit the default's threshold; "none" turns it off.
    factor, _ = _run(llm, ids, 16, {"dllm_block_length": 8, "dllm_parallel": "factor"})
    assert factor == [llada_generate_parallel(ref.logits, p, mask, 16, 8, "factor")[0]
                      for p in ids]
    exact, _ = _run(llm, ids, 16, {"dllm_block_length": 8, "dllm_parallel": "none"})
    assert exact == [llada_generate(ref.logits, p, mask, 16, 16, 8) for p in ids]


@pytest.mark.parametrize("extra,message", [
    ({"dllm_parallel": "fast"}, "dllm_parallel must be one of none, threshold, factor"),
    ({"dllm_parallel": "threshold", "dllm_threshold": 0}, "must be a number in \\(0, 1\\]"),
    ({"dllm_parallel": "threshold", "dllm_threshold": 1.5}, "must be a number in \\(0, 1\\]"),
    ({"dllm_parallel": "factor", "dllm_factor": -1}, "dllm_factor must be a number > 0"),
    ({"dllm_threshold": 0.8}, "dllm_threshold applies to dllm_parallel='threshold' only"),
    ({"dllm_parallel": "threshold", "dllm_factor": 2.0}, "dllm_factor applies to"),
    ({"dllm_parallel": "threshold", "dllm_steps": 8}, "dllm_steps does not apply"),
])
def test_bad_parallel_knobs_are_rejected_and_the_engine_serves_on(llada_engine, extra,
                                                                  message):
    from vllm.exceptions import VLLMValidationError

    llm = llada_engine()
    with pytest.raises(VLLMValidationError, match=message):
        _run(llm, [[5, 6, 7]], 8, extra)
    tokens, _ = _run(llm, [[5, 6, 7]], 8, {"dllm_parallel": "threshold"})
    assert len(tokens[0]) == 8


@pytest.mark.parametrize("cache", ["none", "dual", "prefix"])
@pytest.mark.parametrize("rule,value", [("threshold", 0.05), ("factor", 4.0)])
def test_dream_parallel_decoding_matches_reference(dream_engine, tiny_dream, cache, rule,
                                                   value):
    """Dream decodes in parallel within Fast-dLLM's block-wise generation
    (dllm_block_length), alone and with its caches."""
    llm = dream_engine()
    ref = load_reference_model(tiny_dream)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    knob = "dllm_threshold" if rule == "threshold" else "dllm_factor"
    extra = {"dllm_block_length": 8, "dllm_parallel": rule, knob: value, "dllm_cache": cache}
    got, figures = _run(llm, ids, 24, extra)
    parallel = (rule, value, 1.0) if rule == "threshold" else (rule, 0.9, value)
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = dream_generate_blockwise(ref, prompt, ref.spec.mask_token_id, 24,
                                                  24, 8, cache, parallel=parallel)
        assert tokens == want
        assert fig["forwards"] == want_fig["forwards"] + 1
    # Fewer forwards than one token per step (3 blocks of 8: 24 + the prompt pass).
    assert sum(f["forwards"] for f in figures) < 25 * len(ids) * 0.75


def test_dream_parallel_decoding_needs_blocks(dream_engine):
    from vllm.exceptions import VLLMValidationError

    llm = dream_engine()
    with pytest.raises(VLLMValidationError, match="dllm_parallel for Dream needs "
                                                  "dllm_block_length"):
        _run(llm, [[5, 6, 7]], 8, {"dllm_parallel": "threshold"})
