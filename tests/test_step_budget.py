"""A step's token budget running out.

vLLM's scheduler hands out a step's token budget (``max_num_batched_tokens``)
to running requests first, in queue order, and would give a request only part of
its sequence when too little is left. A denoising request must run whole (its
forward is the reference's full bidirectional pass), so the whole-sequence
scheduler defers it to the next step instead. Here the budget (128 tokens) holds
about three sequences while more requests than that run at once, with prompts
still being consumed in chunks next to denoising requests; every request must end
with the tokens it gives when run alone, and the engine must keep serving.
"""

from __future__ import annotations

import time

import pytest
from engine_steps import run_engine
from vllm import SamplingParams

from vllm_dare.reference import llada_generate, load_reference_model

STEP_TOKENS = 128
MAX_ENGINE_STEPS = 600


@pytest.fixture(scope="module")
def budget_engine(engines, tiny_llada):
    return lambda: engines.get(tiny_llada, max_model_len=STEP_TOKENS,
                               max_num_batched_tokens=STEP_TOKENS, max_num_seqs=16)


def _run(llm, requests):
    return run_engine(llm, requests, MAX_ENGINE_STEPS, tag="budget")


def _params(gen, steps, block, **extra):
    return SamplingParams(max_tokens=gen, ignore_eos=True,
                          extra_args={"dllm_steps": steps, "dllm_block_length": block, **extra})


# (prompt length, max_tokens, steps, block length): sequences of 20 to 100 tokens,
# so a 128-token step holds one to five of them and prompts are cut into chunks.
SHAPES = [(40, 32, 16, 8), (12, 16, 8, 8), (60, 40, 20, 8), (5, 8, 8, 8),
          (30, 64, 32, 16), (70, 24, 12, 8), (17, 16, 16, 16), (45, 48, 24, 16),
          (9, 32, 16, 8), (88, 8, 4, 8)]


def test_requests_beyond_the_step_budget_run_whole_and_match_the_reference(
    budget_engine, tiny_llada
):
    llm = budget_engine()
    ref = load_reference_model(tiny_llada)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    vocab = ref.spec.vocab_size
    prompts = [[(7 * k + 3 * i) % (vocab - 10) + 5 for i in range(n)]
               for k, (n, *_rest) in enumerate(SHAPES)]
    assert sum(n + g for n, g, *_ in SHAPES) > 3 * STEP_TOKENS
    requests = [(p, _params(g, s, b)) for p, (_n, g, s, b) in zip(prompts, SHAPES)]
    outs = _run(llm, requests)
    for k, (prompt, (_n, gen, steps, block)) in enumerate(zip(prompts, SHAPES)):
        assert outs[k].outputs[0].finish_reason == "length", k
        want = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, gen, steps, block)
        assert list(outs[k].outputs[0].token_ids) == want, k
    assert not scheduler.running and not scheduler.waiting
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_a_request_whose_step_cannot_be_explained_ends_alone(
    budget_engine, tiny_llada, caplog
):
    """If a step hands a request part of its canvas (what a partial schedule
    did), that request ends with finish_reason "error" and a logged reason; the
    request beside it finishes with the reference's tokens and the engine keeps
    serving."""
    llm = budget_engine()
    ref = load_reference_model(tiny_llada)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]
    params = _params(16, 16, 8)
    ids = [f"broken-{k}-{time.monotonic_ns()}" for k in range(2)]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    engine.step()  # both prompt passes
    engine.step()  # a first denoising step
    # (the engine adds a suffix to each request id)
    broken = next(r for k, r in scheduler.requests.items() if k.startswith(ids[0]))
    assert len(broken.spec_token_ids) == 16
    broken.spec_token_ids = broken.spec_token_ids[:13]
    caplog.set_level("ERROR", logger="vllm_dare")
    done = {}
    for _ in range(MAX_ENGINE_STEPS):
        done.update({o.request_id: o for o in engine.step() if o.finished})
        if len(done) == 2:
            break
    assert done[ids[0]].outputs[0].finish_reason == "error"
    assert list(done[ids[0]].outputs[0].token_ids) == []
    assert f"Request {broken.request_id} ended with finish_reason=error" in caplog.text
    assert "got 13 canvas logits, expected 16" in caplog.text
    want = llada_generate(ref.logits, prompts[1], ref.spec.mask_token_id, 16, 16, 8)
    assert done[ids[1]].outputs[0].finish_reason == "length"
    assert list(done[ids[1]].outputs[0].token_ids) == want
    assert not scheduler.running and not scheduler.requests
    again = _run(llm, [(prompts[0], params)])
    assert list(again[0].outputs[0].token_ids) == llada_generate(
        ref.logits, prompts[0], ref.spec.mask_token_id, 16, 16, 8)
