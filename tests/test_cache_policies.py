"""Cache policies through vLLM equal their plain PyTorch references token for
token, batched, and a step that feeds part of the sequence computes only that
part (``computed_rows``)."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from vllm_dare.reference import load_reference_model
from vllm_dare.reference.fast_dllm_cache import llada_generate_cached
from vllm_dare.reference.generation import llada_generate

PROMPTS = [
    "hello world",
    "12+34=",
    "a much longer prompt that spans several dozen tokens of text",
    "x",
    "Sort: 9 3 7 1",
]


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
