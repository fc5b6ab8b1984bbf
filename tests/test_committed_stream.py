"""Streaming while denoising: a streaming request gets its canvas's committed
prefix (the leading unmasked tokens, which LLaDA and Dream never change again) as
it grows, with the output of the step that unmasked it, and the final output carries
the rest. Checked step by step against the canvases the reference generation
produces, through the engine's own step loop with ``output_kind=DELTA`` (what
the OpenAI server uses for ``stream=true``)."""

from __future__ import annotations

import time

import pytest
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from vllm_dare.reference import dream_generate, llada_generate, load_reference_model

PROMPTS = ["hello world", "12+34=", "Sort: 9 3 7 1"]


def _recording(ref, prompt_len, canvases):
    """The reference's logits function, recording the canvas of every forward."""
    def logits(x):
        canvases.append(x[prompt_len:].tolist())
        return ref.logits(x)
    return logits


def _prefix(canvas, mask_id, stops=()):
    n = 0
    for token in canvas:
        if token == mask_id or token in stops:
            break
        n += 1
    return n


def _stream(llm, prompts, params, max_steps=200):
    """Step the engine over ``prompts`` (token ids); per request the number of
    tokens received after each engine step until it finished, and all tokens."""
    engine = llm.llm_engine
    ids = [f"stream-{k}-{time.monotonic_ns()}" for k in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    received = {rid: [] for rid in ids}
    lengths = {rid: [] for rid in ids}
    finished = set()
    for _ in range(max_steps):
        for out in engine.step():
            received[out.request_id] += list(out.outputs[0].token_ids)
            if out.finished:
                finished.add(out.request_id)
        for rid in ids:
            if rid not in finished:
                lengths[rid].append(len(received[rid]))
        if len(finished) == len(ids):
            return [lengths[r] for r in ids], [received[r] for r in ids]
    pytest.fail("streaming requests did not finish")


def _delta(max_tokens, extra, ignore_eos=True):
    return SamplingParams(max_tokens=max_tokens, extra_args=extra, ignore_eos=ignore_eos,
                          output_kind=RequestOutputKind.DELTA)


def _check_steps(lengths, canvases, mask_id, stops=()):
    """Engine step 0 consumes the prompt; step s >= 1 is fed canvas s-1, and what
    the client has after it is the committed prefix of the canvas that step made
    (the canvas fed to the next step)."""
    assert lengths[0] == 0
    want = [_prefix(c, mask_id, stops) for c in canvases[1:]]
    assert lengths[1:] == want[: len(lengths) - 1]


def test_llada_streams_its_committed_prefix_step_by_step(llada_engine, tiny_llada):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    mask = ref.spec.mask_token_id
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 16, "dllm_block_length": 8}
    lengths, received = _stream(llm, ids, _delta(16, extra))
    for prompt, got_lengths, got in zip(ids, lengths, received):
        canvases = []
        want = llada_generate(_recording(ref, len(prompt), canvases), prompt, mask, 16, 16, 8)
        assert got == want
        assert len(canvases) == 16
        _check_steps(got_lengths, canvases, mask)
        # The first block (8 of 16 tokens) is final after 8 of the 16 steps, so
        # it reached the client before the request finished.
        assert got_lengths[-1] >= 8


def test_llada_stream_stops_before_eos_and_ends_like_the_final_output(
        llada_eos_engine, tiny_llada_eos):
    llm = llada_eos_engine()
    ref = load_reference_model(tiny_llada_eos)
    mask = ref.spec.mask_token_id
    eos = llm.get_tokenizer().eos_token_id
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 16, "dllm_block_length": 8}
    lengths, received = _stream(llm, ids, _delta(16, extra, ignore_eos=False))
    final = llm.generate([{"prompt_token_ids": i} for i in ids],
                         SamplingParams(max_tokens=16, extra_args=extra), use_tqdm=False)
    cut_early = 0
    for prompt, got_lengths, got, out in zip(ids, lengths, received, final):
        canvases = []
        canvas = llada_generate(_recording(ref, len(prompt), canvases), prompt, mask, 16, 16, 8)
        cut = canvas.index(eos) + 1 if eos in canvas else len(canvas)
        cut_early += cut < len(canvas)
        assert got == canvas[:cut] == list(out.outputs[0].token_ids)
        # Nothing at or after EOS is streamed before the request finishes.
        _check_steps(got_lengths, canvases, mask, stops={eos})
    assert cut_early > 0


def test_dream_streams_its_committed_prefix_step_by_step(dream_engine, tiny_dream):
    llm = dream_engine()
    ref = load_reference_model(tiny_dream)
    mask = ref.spec.mask_token_id
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 8, "dllm_alg": "entropy"}
    lengths, received = _stream(llm, ids, _delta(16, extra))
    for prompt, got_lengths, got in zip(ids, lengths, received):
        canvases = []
        want = dream_generate(_recording(ref, len(prompt), canvases), prompt, mask, 16, 8,
                              alg="entropy")
        assert got == want
        assert len(canvases) == 8
        _check_steps(got_lengths, canvases, mask)
