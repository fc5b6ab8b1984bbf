"""Cache policies through vLLM equal their plain PyTorch references token for
token, batched, and a step that feeds part of the sequence computes only that
part (``computed_rows``)."""

from __future__ import annotations

import pytest
from engine_steps import PROMPTS
from vllm import SamplingParams

from vllm_dare.reference import load_reference_model
from vllm_dare.reference.dkv_cache import (
    dream_generate_dkv,
    llada_generate_dkv_decode,
    llada_generate_dkv_greedy,
)
from vllm_dare.reference.fast_dllm_cache import llada_generate_cached
from vllm_dare.reference.fast_dllm_dream import dream_generate_blockwise
from vllm_dare.reference.freecache import dream_generate_freecache, llada_generate_freecache
from vllm_dare.reference.generation import llada_generate


def _run(llm, ids, max_tokens, extra):
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outs],
            [o.kv_transfer_params["dllm"] for o in outs])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("gen_length,steps,block_length", [(32, 32, 8), (24, 12, 8)])
def test_llada_fast_dllm_cache_matches_reference(llada_engine, tiny_llada, cache,
                                                 gen_length, steps, block_length):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    extra = {"dllm_steps": steps, "dllm_block_length": block_length, "dllm_cache": cache}
    got, figures = _run(llm, ids, gen_length, extra)
    layers = ref.spec.num_layers
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = llada_generate_cached(
            ref, prompt, ref.spec.mask_token_id, gen_length, steps, block_length, cache)
        assert tokens == want
        # The engine adds its prompt-only forward over the prompt.
        assert fig["forwards"] == want_fig["forwards"] + 1
        assert fig["computed_rows"] == want_fig["computed_rows"] + len(prompt) * layers


@pytest.mark.parametrize("gen_length,steps,block_length,refresh", [
    (32, 32, 16, None), (24, 24, 8, 3), (16, 32, 8, 4)])
def test_llada_dkv_decode_matches_reference(llada_engine, tiny_llada, gen_length, steps,
                                            block_length, refresh):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": steps, "dllm_block_length": block_length, "dllm_cache": "dkv_decode"}
    if refresh is not None:
        extra["dllm_cache_refresh"] = refresh
    got, figures = _run(llm, ids, gen_length, extra)
    layers = ref.spec.num_layers
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = llada_generate_dkv_decode(
            ref, prompt, ref.spec.mask_token_id, gen_length, steps, block_length,
            cache_reloading_step=refresh or 8)
        assert tokens == want
        assert fig["forwards"] == want_fig["forwards"] + 1
        assert fig["computed_rows"] == want_fig["computed_rows"] + len(prompt) * layers
        assert fig["computed_rows"] < fig["forwards"] * (len(prompt) + gen_length) * layers


@pytest.mark.parametrize("window", [None, 8, 16])
def test_llada_freecache_matches_reference(llada_engine, tiny_llada, window):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 32, "dllm_block_length": 8, "dllm_cache": "freecache"}
    if window is not None:
        extra["dllm_cache_window"] = window
    got, figures = _run(llm, ids, 32, extra)
    layers = ref.spec.num_layers
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = llada_generate_freecache(ref, prompt, ref.spec.mask_token_id,
                                                  32, 32, 8, window)
        assert tokens == want
        assert fig["computed_rows"] == want_fig["computed_rows"] + len(prompt) * layers


def test_cached_generation_differs_from_exact_and_saves_rows(llada_engine, tiny_llada):
    """The cache is really used: with stale K/V the tokens are not all exact mode's
    (on this random model), and the rows computed are fewer."""
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 32, "dllm_block_length": 8}
    exact, exact_fig = _run(llm, ids, 32, extra)
    dual, dual_fig = _run(llm, ids, 32, {**extra, "dllm_cache": "dual"})
    assert exact == [llada_generate(ref.logits, i, ref.spec.mask_token_id, 32, 32, 8)
                     for i in ids]
    assert dual != exact
    for prompt, e, d in zip(ids, exact_fig, dual_fig):
        L, layers = len(prompt) + 32, ref.spec.num_layers
        # Exact: prompt pass + 32 whole-sequence forwards. Dual: prompt pass + per
        # block one whole-sequence forward and 7 forwards of the 8-token block.
        assert e["computed_rows"] == (len(prompt) + 32 * L) * layers
        assert d["computed_rows"] == (len(prompt) + 4 * L + 4 * 7 * 8) * layers


def test_policies_mixed_in_one_batch_with_guidance_and_an_abort(llada_engine, tiny_llada):
    """Requests with different policies (one guided, one aborted part-way) share
    the engine's steps; each equals its own reference and every KV block comes
    back."""
    from engine_steps import run_engine

    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS + PROMPTS[:1]]
    mask = ref.spec.mask_token_id
    base = {"dllm_steps": 16, "dllm_block_length": 8}
    setups = [
        ({**base, "dllm_cache": "dual"}, lambda p: llada_generate_cached(
            ref, p, mask, 16, 16, 8, "dual")[0]),
        ({**base, "dllm_cache": "prefix", "dllm_cfg_scale": 0.5}, lambda p: llada_generate_cached(
            ref, p, mask, 16, 16, 8, "prefix", cfg_scale=0.5)[0]),
        (base, lambda p: llada_generate(ref.logits, p, mask, 16, 16, 8)),
        ({**base, "dllm_cache": "dkv_decode", "dllm_cache_refresh": 4},
         lambda p: llada_generate_dkv_decode(ref, p, mask, 16, 16, 8, 4)[0]),
        ({**base, "dllm_cache": "dual"}, None),  # aborted
        ({**base, "dllm_cache": "prefix"}, lambda p: llada_generate_cached(
            ref, p, mask, 16, 16, 8, "prefix")[0]),
    ]
    requests = [(p, SamplingParams(max_tokens=16, extra_args=extra, ignore_eos=True))
                for p, (extra, _) in zip(ids, setups)]
    done = run_engine(llm, requests, max_steps=200, abort_after=(4, 4), tag="mixed")
    for k, (prompt, (_, reference)) in enumerate(zip(ids, setups)):
        if reference is None:
            assert done[k] is None
            continue
        assert list(done[k].outputs[0].token_ids) == reference(prompt), k
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    assert not scheduler.running and not scheduler.waiting
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    llm.llm_engine.step()  # the worker hears of finished requests at the next step
    sampler = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model_state.sampler
    assert not sampler.policies and not sampler.computed_rows and not sampler.states


@pytest.mark.parametrize("extra,message", [
    ({"dllm_cache": "lru"},
     "dllm_cache must be one of dkv_decode, dkv_greedy, dkv_pd, dkv_prefill, dual, "
     "freecache, none, prefix"),
    ({"dllm_cache": "dkv_decode", "dllm_cfg_scale": 1.0}, "does not support classifier-free"),
    ({"dllm_cache": "dkv_decode", "dllm_cache_window": 2}, "has no dllm_cache_window"),
    ({"dllm_cache": "dkv_prefill"}, "applies to Dream models only"),
    ({"dllm_cache": "dkv_pd"}, "applies to Dream models only"),
    ({"dllm_cache": "freecache", "dllm_block_length": 8, "dllm_cache_window": 4},
     "must be at least the block length 8"),
    ({"dllm_cache": "dual", "dllm_cache_refresh": 4}, "has no dllm_cache_refresh"),
    ({"dllm_cache": "prefix", "dllm_cache_window": 4}, "has no dllm_cache_window"),
    ({"dllm_cache": 1}, "dllm_cache must be a string"),
    ({"dllm_cache": "dkv_greedy"}, "needs dllm_remasking='random'"),
    ({"dllm_cache": "dkv_greedy", "dllm_remasking": "random", "dllm_cfg_scale": 1.0},
     "does not support classifier-free guidance"),
    ({"dllm_cache_refresh": 0}, "dllm_cache_refresh must be a positive integer"),
])
def test_bad_cache_knobs_are_rejected_and_the_engine_serves_on(llada_engine, extra, message):
    from vllm.exceptions import VLLMValidationError

    llm = llada_engine()
    with pytest.raises(VLLMValidationError, match=message):
        _run(llm, [[5, 6, 7]], 8, extra)
    tokens, _ = _run(llm, [[5, 6, 7]], 8, {"dllm_cache": "dual", "dllm_block_length": 4})
    assert len(tokens[0]) == 8


@pytest.mark.parametrize("cache,refresh,alg", [
    ("dkv_decode", None, "maskgit_plus"), ("dkv_decode", 3, "entropy"),
    ("dkv_prefill", None, "topk_margin"), ("dkv_pd", 3, "maskgit_plus")])
def test_dream_dkv_cache_matches_reference(dream_engine, tiny_dream, cache, refresh, alg):
    llm = dream_engine()
    ref = load_reference_model(tiny_dream)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 12, "dllm_alg": alg, "dllm_cache": cache}
    if refresh is not None:
        extra["dllm_cache_refresh"] = refresh
    got, figures = _run(llm, ids, 24, extra)
    layers = ref.spec.num_layers
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = dream_generate_dkv(
            ref, prompt, ref.spec.mask_token_id, 24, 12, cache.removeprefix("dkv_"),
            cache_reloading_step=refresh or 4, alg=alg)
        assert tokens == want
        assert fig["forwards"] == want_fig["forwards"] + 1
        assert fig["computed_rows"] == want_fig["computed_rows"] + len(prompt) * layers
        assert fig["computed_rows"] < fig["forwards"] * (len(prompt) + 24) * layers


def test_dream_freecache_matches_reference(dream_engine, tiny_dream):
    llm = dream_engine()
    ref = load_reference_model(tiny_dream)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    got, figures = _run(llm, ids, 24, {"dllm_steps": 12, "dllm_alg": "maskgit_plus",
                                       "dllm_cache": "freecache"})
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = dream_generate_freecache(ref, prompt, ref.spec.mask_token_id, 24, 12)
        assert tokens == want
        assert fig["computed_rows"] == (want_fig["computed_rows"]
                                        + len(prompt) * ref.spec.num_layers)


@pytest.mark.parametrize("gen_length,steps,block_length,refresh,window", [
    (32, 32, 8, None, None), (32, 16, 16, 3, 2), (24, 12, 8, 2, 1)])
def test_llada_dkv_greedy_matches_reference(llada_engine, tiny_llada, gen_length, steps,
                                            block_length, refresh, window):
    """dKV-Cache Greedy: each request's order is drawn from its seed at every block
    start, as the reference draws it; tokens, forwards and rows equal."""
    import torch

    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": steps, "dllm_block_length": block_length,
             "dllm_cache": "dkv_greedy", "dllm_remasking": "random"}
    if refresh is not None:
        extra["dllm_cache_refresh"] = refresh
    if window is not None:
        extra["dllm_cache_window"] = window
    extras = [{**extra, "dllm_seed": 100 + k} for k in range(len(ids))]
    params = [SamplingParams(max_tokens=gen_length, extra_args=e, ignore_eos=True)
              for e in extras]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    layers = ref.spec.num_layers
    for k, (prompt, out) in enumerate(zip(ids, outs)):
        want, want_fig = llada_generate_dkv_greedy(
            ref, prompt, ref.spec.mask_token_id, gen_length, steps, block_length,
            cache_reloading_step=refresh or 2, window_size=4 if window is None else window,
            generator=torch.Generator().manual_seed(100 + k))
        fig = out.kv_transfer_params["dllm"]
        assert list(out.outputs[0].token_ids) == want
        assert fig["forwards"] == want_fig["forwards"] + 1
        assert fig["computed_rows"] == want_fig["computed_rows"] + len(prompt) * layers
        assert fig["computed_rows"] < fig["forwards"] * (len(prompt) + gen_length) * layers


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("gen_length,steps,block_length", [(24, 12, 8), (16, 16, 4)])
def test_dream_blockwise_generation_with_fast_dllm_caches_matches_reference(
        dream_engine, tiny_dream, cache, gen_length, steps, block_length):
    """Fast-dLLM's block-wise Dream generation (dllm_block_length on a Dream
    request) with no cache, PrefixCache and DualCache equals its reference in tokens,
    forwards and computed rows."""
    llm = dream_engine()
    ref = load_reference_model(tiny_dream)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": steps, "dllm_block_length": block_length, "dllm_cache": cache}
    got, figures = _run(llm, ids, gen_length, extra)
    layers = ref.spec.num_layers
    for prompt, tokens, fig in zip(ids, got, figures):
        want, want_fig = dream_generate_blockwise(
            ref, prompt, ref.spec.mask_token_id, gen_length, steps, block_length, cache)
        assert tokens == want
        assert fig["forwards"] == want_fig["forwards"] + 1
        assert fig["computed_rows"] == want_fig["computed_rows"] + len(prompt) * layers
    if cache == "dual":
        full = (len(ids[0]) + gen_length) * layers
        assert figures[0]["computed_rows"] < figures[0]["forwards"] * full / 2


@pytest.mark.parametrize("extra,message", [
    ({"dllm_cache": "freecache", "dllm_cache_window": 16}, "applies to LLaDA models only"),
    ({"dllm_cache": "dual"}, "block-wise generation \\(dllm_block_length set\\) only"),
    ({"dllm_cache": "prefix"}, "block-wise generation \\(dllm_block_length set\\) only"),
    ({"dllm_cache": "dkv_decode", "dllm_block_length": 4}, "official generation only"),
    ({"dllm_block_length": 4, "dllm_alg": "entropy"}, "dllm_alg does not apply"),
    ({"dllm_block_length": 4, "dllm_steps": 2}, "at least 2 steps per block"),
    ({"dllm_block_length": 3}, "must be a multiple of the block length 3"),
    ({"dllm_parallel": "threshold"}, "dllm_parallel for Dream needs dllm_block_length"),
    ({"dllm_cache": "dkv_prefill", "dllm_cache_refresh": 2}, "has no dllm_cache_refresh"),
])
def test_dream_refuses_what_does_not_apply(dream_engine, extra, message):
    from vllm.exceptions import VLLMValidationError

    llm = dream_engine()
    with pytest.raises(VLLMValidationError, match=message):
        _run(llm, [[5, 6, 7]], 8, extra)


def test_engine_default_policy_from_additional_config(engines, tiny_llada):
    """``--additional-config '{"dllm_cache": "dual"}'`` is every request's default;
    a request may still pick another policy."""
    llm = engines.get(tiny_llada, additional_config={"dllm_cache": "dual"})
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:3]]
    base = {"dllm_steps": 16, "dllm_block_length": 8}
    mask = ref.spec.mask_token_id
    default, _ = _run(llm, ids, 16, base)
    exact, _ = _run(llm, ids, 16, {**base, "dllm_cache": "none"})
    assert default == [llada_generate_cached(ref, p, mask, 16, 16, 8, "dual")[0] for p in ids]
    assert exact == [llada_generate(ref.logits, p, mask, 16, 16, 8) for p in ids]


@pytest.mark.parametrize("config,message", [
    ({"dllm_cache": "dual", "dllm_cache_refresh": 2}, "has no dllm_cache_refresh"),
    ({"dllm_cache": "ring"}, "dllm_cache must be one of"),
])
def test_bad_engine_default_policy_is_refused_at_start(config, message):
    from vllm_dare.model_executor.denoising.params import DenoisingDefaults

    with pytest.raises(ValueError, match=message):
        DenoisingDefaults.from_generation_config("llada", 5, 64, {}, engine_knobs=config)
    with pytest.raises(ValueError, match="applies to Dream models only"):
        DenoisingDefaults.from_generation_config("llada", 5, 64, {},
                                                 engine_knobs={"dllm_cache": "dkv_pd"})
    # Dream's parallel decoding needs a block length, which no engine default sets.
    with pytest.raises(ValueError, match="dllm_parallel for Dream needs dllm_block_length"):
        DenoisingDefaults.from_generation_config("dream", 5, 64, {},
                                                 engine_knobs={"dllm_parallel": "threshold"})


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_dare_composes_with_the_caches(engines, tiny_llada, cache):
    """DARE acts on the tokens a cache policy feeds: with nothing reused it equals
    the policy's reference; with reuse on it counts the fed rows only and skips
    some of them (less work than the policy alone)."""
    config = {"dare": {"mode": "kv+o", "tau_kv": 0.05, "tau_o": 0.05}}
    llm = engines.get(tiny_llada, attention_backend="dare", additional_config=config)
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 32, "dllm_block_length": 8, "dllm_cache": cache}
    params = SamplingParams(max_tokens=32, extra_args={**extra, "dare_tau_kv": 0.0,
                                                        "dare_tau_o": 0.0}, ignore_eos=True)
    off = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    for prompt, out in zip(ids, off):
        want, fig = llada_generate_cached(ref, prompt, ref.spec.mask_token_id, 32, 32, 8, cache)
        assert list(out.outputs[0].token_ids) == want
        assert out.kv_transfer_params["dare"]["kv_reused"] == 0
    params = SamplingParams(max_tokens=32, extra_args=extra, ignore_eos=True)
    on = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    for prompt, out in zip(ids, on):
        dllm, dare = out.kv_transfer_params["dllm"], out.kv_transfer_params["dare"]
        _, fig = llada_generate_cached(ref, prompt, ref.spec.mask_token_id, 32, 32, 8, cache)
        assert dllm["computed_rows"] == fig["computed_rows"] + len(prompt) * ref.spec.num_layers
        # DARE sees exactly the fed rows, and reuses some of them.
        assert dare["token_layers"] == dllm["computed_rows"]
        assert 0 < dare["kv_reused"] < dare["token_layers"]
        assert 0 < dare["o_reused"] < dare["token_layers"]


def test_a_policy_with_a_bad_plan_ends_only_its_request(llada_engine, tiny_llada, monkeypatch):
    """A plan that does not fit its sequence (a bug in a policy) ends that request
    with finish_reason "error"; the request beside it is served as its reference."""
    import numpy as np

    from vllm_dare.cache_policies.base import ForwardPlan
    from vllm_dare.cache_policies.dual import DualCache

    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    tok = llm.get_tokenizer()
    good, bad = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2])
    real_plan = DualCache.plan

    def plan(self, view):
        if view.prompt_len == len(bad) and not view.block_start:
            return ForwardPlan(np.array([view.prompt_len + view.gen_length]))  # past the end
        return real_plan(self, view)

    monkeypatch.setattr(DualCache, "plan", plan)
    params = SamplingParams(max_tokens=16, ignore_eos=True, extra_args={
        "dllm_steps": 16, "dllm_block_length": 8, "dllm_cache": "dual"})
    outs = llm.generate([{"prompt_token_ids": p} for p in (good, bad)], params, use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error"
    assert list(outs[0].outputs[0].token_ids) == llada_generate_cached(
        ref, good, ref.spec.mask_token_id, 16, 16, 8, "dual")[0]
    tokens, _ = _run(llm, [good], 16, {"dllm_steps": 16, "dllm_block_length": 8})
    assert len(tokens[0]) == 16  # the engine serves on
