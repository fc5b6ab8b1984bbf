"""Exact mode: vLLM's greedy output equals the reference generation token for token.

The reference (``vllm_dare.reference``) recomputes the whole sequence every step in
plain PyTorch; it is checked against transformers in ``test_reference_model.py``.
Batches mix prompt lengths; each setting runs all prompts in one ``generate`` call.
"""

from __future__ import annotations

import pytest
from engine_steps import PROMPTS
from vllm import SamplingParams

from vllm_dare.reference import dream_generate, llada_generate, load_reference_model


def _token_ids(llm, prompts):
    tok = llm.get_tokenizer()
    return [tok.encode(p) for p in prompts]


def _generate(llm, ids, max_tokens, extra, ignore_eos=True):
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra, ignore_eos=ignore_eos)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize(
    "gen_length,steps,block_length",
    [(16, 16, 16), (16, 8, 4), (32, 16, 8), (24, 24, 8), (32, 64, 32), (8, 2, 8)],
)
@pytest.mark.parametrize("remasking", ["low_confidence"])
def test_llada_matches_reference(llada_engine, tiny_llada, gen_length, steps, block_length, remasking):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = _token_ids(llm, PROMPTS)
    extra = {"dllm_steps": steps, "dllm_block_length": block_length, "dllm_remasking": remasking}
    got = _generate(llm, ids, gen_length, extra)
    want = [
        llada_generate(ref.logits, i, ref.spec.mask_token_id, gen_length, steps, block_length)
        for i in ids
    ]
    assert got == want


def test_llada_defaults_are_one_block_one_token_per_step(llada_engine, tiny_llada):
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = _token_ids(llm, PROMPTS[:3])
    got = _generate(llm, ids, 12, {})
    want = [llada_generate(ref.logits, i, ref.spec.mask_token_id, 12, 12, 12) for i in ids]
    assert got == want


@pytest.mark.parametrize("gen_length,steps,block_length,expected_steps", [
    (16, 16, 16, 16),
    (32, 64, 32, 32),  # steps that unmask nothing are skipped without a forward
])
def test_llada_reports_forwards(llada_engine, gen_length, steps, block_length, expected_steps):
    llm = llada_engine()
    ids = _token_ids(llm, PROMPTS[:2])
    params = SamplingParams(max_tokens=gen_length, ignore_eos=True,
                            extra_args={"dllm_steps": steps, "dllm_block_length": block_length})
    for out in llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False):
        stats = out.kv_transfer_params["dllm"]
        assert stats["denoising_steps"] == expected_steps
        assert stats["forwards"] == expected_steps + 1  # + the prompt-only pass
        assert stats["gen_length"] == gen_length


def test_llada_output_stops_at_first_eos(llada_eos_engine, tiny_llada_eos):
    llm = llada_eos_engine()
    ref = load_reference_model(tiny_llada_eos)
    eos = llm.get_tokenizer().eos_token_id
    ids = _token_ids(llm, PROMPTS)
    extra = {"dllm_steps": 16, "dllm_block_length": 8}
    got = _generate(llm, ids, 16, extra, ignore_eos=False)
    cut_early = 0
    for prompt, out in zip(ids, got):
        canvas = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 16, 8)
        cut = canvas.index(eos) + 1 if eos in canvas else len(canvas)
        cut_early += cut < len(canvas)
        assert out == canvas[:cut]
    # The checkpoint is built so that EOS shows up inside the canvas.
    assert cut_early > 0


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("gen_length,steps", [(16, 16), (24, 8), (8, 20)])
def test_dream_matches_reference(dream_engine, tiny_dream, alg, gen_length, steps):
    llm = dream_engine()
    ref = load_reference_model(tiny_dream)
    ids = _token_ids(llm, PROMPTS)
    got = _generate(llm, ids, gen_length, {"dllm_steps": steps, "dllm_alg": alg})
    want = [
        dream_generate(ref.logits, i, ref.spec.mask_token_id, gen_length, steps, alg=alg)
        for i in ids
    ]
    assert got == want


@pytest.mark.parametrize("cfg_scale", [0.5, 2.0])
def test_llada_classifier_free_guidance_matches_reference(llada_engine, tiny_llada, cfg_scale):
    """Guided requests run an unconditional twin; unguided ones in the same batch
    are unaffected."""
    llm = llada_engine()
    ref = load_reference_model(tiny_llada)
    ids = _token_ids(llm, PROMPTS)
    guided = {"dllm_steps": 8, "dllm_block_length": 8, "dllm_cfg_scale": cfg_scale}
    plain = {"dllm_steps": 8, "dllm_block_length": 8}
    params = [
        SamplingParams(max_tokens=16, extra_args=guided if k % 2 == 0 else plain, ignore_eos=True)
        for k in range(len(ids))
    ]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert len(outs) == len(ids)  # the twins never reach the caller
    for k, (prompt, out) in enumerate(zip(ids, outs)):
        scale = cfg_scale if k % 2 == 0 else 0.0
        want = llada_generate(
            ref.logits, prompt, ref.spec.mask_token_id, 16, 8, 8, cfg_scale=scale
        )
        assert list(out.outputs[0].token_ids) == want, k
    # Guidance changes the result (the twin's logits are really used).
    unguided = llada_generate(ref.logits, ids[0], ref.spec.mask_token_id, 16, 8, 8)
    assert list(outs[0].outputs[0].token_ids) != unguided

