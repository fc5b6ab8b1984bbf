"""Bad diffusion knobs are rejected at admission with a clear message, and the
engine keeps serving other requests."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_dare.model_executor.denoising.params import (
    DenoisingDefaults,
    resolve_params,
)

LLADA_DEFAULTS = DenoisingDefaults(family="llada", mask_token_id=2, canvas_length=64)
DREAM_DEFAULTS = DenoisingDefaults(family="dream", mask_token_id=1, canvas_length=64)

BAD_LLADA = [
    (10, {"dllm_block_length": 4}, "multiple of the block length"),
    (16, {"dllm_block_length": 4, "dllm_steps": 6}, "divisible by the number of blocks"),
    (16, {"dllm_steps": 0}, "dllm_steps must be a positive integer"),
    (16, {"dllm_steps": -4}, "dllm_steps must be a positive integer"),
    (16, {"dllm_steps": 2.5}, "dllm_steps must be a positive integer"),
    (16, {"dllm_block_length": 0}, "dllm_block_length must be a positive integer"),
    (16, {"dllm_temperature": -0.5}, "dllm_temperature must be a number >= 0"),
    (16, {"dllm_remasking": "lowest"}, "dllm_remasking must be one of"),
    (16, {"dllm_alg": "entropy"}, "dllm_alg does not apply to LLaDA"),
    (16, {"dllm_stepz": 4}, "unknown diffusion knob 'dllm_stepz'"),
    (16, {"dllm_cfg_scale": -1}, "dllm_cfg_scale must be a number >= 0"),
    (128, {}, "exceeds the served canvas of 64"),
    (16, {"dllm_seed": -1}, "dllm_seed must be an integer"),
    (16, {"dllm_seed": "7"}, "dllm_seed must be an integer"),
]

BAD_DREAM = [
    (16, {"dllm_alg": "greedy"}, "dllm_alg must be one of"),
    (16, {"dllm_top_p": 1.5}, "dllm_top_p must be in (0, 1]"),
    (16, {"dllm_top_k": 0}, "dllm_top_k must be a positive integer"),
    (16, {"dllm_alg_temp": -1.0}, "dllm_alg_temp must be a number >= 0"),
    (16, {"dllm_cfg_scale": 1.0}, "dllm_cfg_scale does not apply to Dream"),
    (16, {"dllm_block_length": 8, "dllm_alg": "entropy"},
     "dllm_alg does not apply with dllm_block_length"),
    (16, {"dllm_seed": 1.5}, "dllm_seed must be an integer"),
]


@pytest.mark.parametrize("max_tokens,extra,message", BAD_LLADA)
def test_llada_knob_errors(max_tokens, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_params(extra, max_tokens, LLADA_DEFAULTS)


@pytest.mark.parametrize("max_tokens,extra,message", BAD_DREAM)
def test_dream_knob_errors(max_tokens, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_params(extra, max_tokens, DREAM_DEFAULTS)


def test_missing_max_tokens_is_an_error():
    with pytest.raises(ValueError, match="max_tokens must be set"):
        resolve_params({}, None, LLADA_DEFAULTS)


def test_defaults_resolution():
    p = resolve_params({}, 32, LLADA_DEFAULTS)
    assert (p.gen_length, p.steps, p.block_length, p.num_blocks) == (32, 32, 32, 1)
    assert p.remasking == "low_confidence" and p.temperature == 0.0
    served = DenoisingDefaults(
        family="llada", mask_token_id=2, canvas_length=64, steps=16, block_length=8
    )
    p = resolve_params({"dllm_steps": 8}, 32, served)
    assert (p.steps, p.block_length, p.steps_per_block) == (8, 8, 2)
    d = resolve_params({}, 20, DREAM_DEFAULTS)
    assert (d.steps, d.alg, d.eps, d.top_p, d.top_k) == (20, "origin", 1e-3, None, None)


def test_generation_config_defaults_are_checked():
    with pytest.raises(ValueError, match="dllm_alg must be one of"):
        DenoisingDefaults.from_generation_config(
            "dream", 1, 64, {"alg": "bogus", "steps": 8}
        )
    d = DenoisingDefaults.from_generation_config(
        "dream", 1, 64, {"alg": "entropy", "steps": 8, "temperature": 0.2, "top_p": 0.95}
    )
    assert DenoisingDefaults.decode(d.encode()) == d


def _ok(llm):
    out = llm.generate("hello", SamplingParams(max_tokens=8), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0


@pytest.mark.parametrize(
    "max_tokens,extra,message",
    [
        (10, {"dllm_block_length": 4}, "multiple of the block length"),
        (16, {"dllm_remasking": "sometimes"}, "dllm_remasking must be one of"),
        (300, {}, "exceeds the served canvas"),
    ],
)
def test_engine_rejects_bad_knobs_and_keeps_serving(llada_engine, max_tokens, extra, message):
    llm = llada_engine()
    # vLLM's client-error type for invalid requests (HTTP 400 in the server).
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate("hello", SamplingParams(max_tokens=max_tokens, extra_args=extra), use_tqdm=False)
    _ok(llm)


def test_engine_rejects_logprobs_and_vllm_temperature(llada_engine):
    llm = llada_engine()
    with pytest.raises(VLLMValidationError, match="logprobs"):
        llm.generate("hello", SamplingParams(max_tokens=8, logprobs=2), use_tqdm=False)
    with pytest.raises((ValueError, VLLMValidationError), match="temperature"):
        llm.generate("hello", SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    _ok(llm)


def test_engine_caps_max_tokens_at_max_model_len_like_the_server(
    llada_engine, tiny_llada, caplog
):
    """prompt + max_tokens past max_model_len: the canvas is what is left of
    max_model_len, as vLLM's OpenAI server computes max_tokens (240 + 32 > 256:
    16 positions, the reference's output for gen_length 16). When the knobs do
    not fit the capped length (block length 32 > 16), the request ends with
    finish_reason "error" and a logged reason; the other requests are served."""
    from vllm_dare.reference import llada_generate, load_reference_model

    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    long_prompt = "y" * 240
    ids = llm.get_tokenizer().encode(long_prompt)
    assert len(ids) == 240
    caplog.set_level("INFO", logger="vllm_dare")
    params = SamplingParams(max_tokens=32)
    outs = llm.generate([long_prompt, "hello"], params, use_tqdm=False)
    assert params.max_tokens == 32  # the caller's object is left alone
    assert list(outs[0].outputs[0].token_ids) == llada_generate(
        ref.logits, ids, ref.spec.mask_token_id, 16, 16, 16)
    assert "max_tokens 32 capped at 16" in caplog.text
    assert len(outs[1].outputs[0].token_ids) == 32
    blocked = llm.generate(
        [long_prompt, "hello"],
        SamplingParams(max_tokens=32, extra_args={"dllm_block_length": 32}),
        use_tqdm=False,
    )
    assert blocked[0].outputs[0].finish_reason == "error"
    assert blocked[0].outputs[0].token_ids == []
    assert "max_tokens=16 must be a multiple of the block length 32" in caplog.text
    assert len(blocked[1].outputs[0].token_ids) == 32
    _ok(llm)
