"""Scheduling when the KV cache cannot hold every request at once.

A denoising request needs the KV-cache blocks of its whole sequence (prompt +
canvas) from its second forward on, and a guided request needs them twice (it
runs with an unconditional twin). The engine here has 7 usable blocks of 16 tokens
(112 token slots) and a step budget of 128 tokens, and gets more than that at
once: requests must wait for blocks rather than start on their prompt's blocks and
be preempted a step later, pairs must run together, a pair that can never fit (in
the KV cache, in a step, in the request slots) must be rejected instead of hanging
the engine, and none of this may change a token.
"""

from __future__ import annotations

import time

import pytest
from engine_steps import run_engine
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from vllm_dare.core.whole_sequence_scheduler import is_cfg_twin
from vllm_dare.reference import llada_generate, load_reference_model

PROMPTS = ["hello world", "12+34=", "a much longer prompt that spans several dozen tokens", "x",
           "another prompt here"]
GEN, STEPS, BLOCK = 32, 16, 8
BLOCK_SIZE = 16
USABLE_BLOCKS = 7  # num_gpu_blocks_override 8, less vLLM's null block
STEP_TOKENS = 128
MAX_ENGINE_STEPS = 400


@pytest.fixture(scope="module")
def small_kv_engine(engines, tiny_llada):
    def get():
        return engines.get(
            tiny_llada, attention_backend="dare",
            additional_config={"dare": {"mode": "kv+o", "tau_kv": 0.05, "tau_o": 0.05}},
            block_size=BLOCK_SIZE, num_gpu_blocks_override=USABLE_BLOCKS + 1,
            max_model_len=USABLE_BLOCKS * BLOCK_SIZE, max_num_batched_tokens=STEP_TOKENS,
            disable_log_stats=False,
        )
    return get


def _params(**extra):
    return SamplingParams(max_tokens=GEN, ignore_eos=True,
                          extra_args={"dllm_steps": STEPS, "dllm_block_length": BLOCK, **extra})


def _preemptions(llm) -> int:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def _run_engine(llm, requests, abort_after=None):
    return run_engine(llm, requests, MAX_ENGINE_STEPS, abort_after)


def test_requests_wait_for_blocks_and_match_the_reference(small_kv_engine, tiny_llada):
    """Five requests need 19 blocks in all. Each starts only when its whole
    sequence fits, so nothing is preempted, and every output is the reference's."""
    llm = small_kv_engine()
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    before = _preemptions(llm)
    outs = _run_engine(llm, [(i, _params(dare_mode="off")) for i in ids])
    assert _preemptions(llm) == before
    for k, prompt in enumerate(ids):
        want = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, GEN, STEPS, BLOCK)
        assert list(outs[k].outputs[0].token_ids) == want, k


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def test_guided_pairs_run_together_and_ones_that_cannot_fit_are_rejected(
    small_kv_engine, tiny_llada, caplog
):
    """A guided request and its twin need their blocks, and their tokens, in the
    same step. Two pairs can never run: the 52-token prompt's (2 x 84 tokens, more
    than a step holds) and the 19-token prompt's (2 x 4 blocks, more than the KV
    cache has). They fail with finish_reason "error" and a logged reason (such a
    pair used to keep the engine stepping forever, or hold up every request queued
    behind it); the other pairs take turns and match the reference."""
    llm = small_kv_engine()
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    too_many_tokens, too_many_blocks = 2, 4
    assert 2 * (len(ids[too_many_tokens]) + GEN) > STEP_TOKENS
    assert 2 * (len(ids[too_many_blocks]) + GEN) <= STEP_TOKENS
    assert 2 * _blocks(len(ids[too_many_blocks]) + GEN) > USABLE_BLOCKS
    before = _preemptions(llm)
    caplog.set_level("ERROR", logger="vllm_dare")
    outs = _run_engine(llm, [(i, _params(dllm_cfg_scale=1.0, dare_mode="off")) for i in ids])
    assert _preemptions(llm) == before
    for k in (too_many_tokens, too_many_blocks):
        assert outs[k].outputs[0].finish_reason == "error"
        assert list(outs[k].outputs[0].token_ids) == []
    assert "a step holds 128 (raise --max-num-batched-tokens)" in caplog.text
    assert "need 8 KV-cache blocks of 16 tokens and the KV cache has 7" in caplog.text
    for k, prompt in enumerate(ids):
        if k in (too_many_tokens, too_many_blocks):
            continue
        want = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, GEN, STEPS, BLOCK,
                              cfg_scale=1.0)
        assert list(outs[k].outputs[0].token_ids) == want, k
    # The engine still serves afterwards.
    again = _run_engine(llm, [(ids[1], _params(dare_mode="off"))])
    assert list(again[0].outputs[0].token_ids) == llada_generate(
        ref.logits, ids[1], ref.spec.mask_token_id, GEN, STEPS, BLOCK)


def test_a_pair_split_by_preemption_is_preempted_whole(small_kv_engine, tiny_llada):
    """If vLLM preempts one of a guided pair (its allocation fallback), the partner
    cannot step alone: it is preempted as well, and the pair restarts together
    with the reference's output."""
    llm = small_kv_engine()
    ref = load_reference_model(tiny_llada)
    prompt = llm.get_tokenizer().encode(PROMPTS[0])
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    engine.add_request(f"split-{time.monotonic_ns()}", {"prompt_token_ids": prompt},
                       _params(dllm_cfg_scale=1.0, dare_mode="off"))
    for _ in range(3):  # prompt pass, then two denoising steps
        assert not any(o.finished for o in engine.step())
    twin = next(r for r in scheduler.running if is_cfg_twin(r.request_id))
    owner = next(r for r in scheduler.running if not is_cfg_twin(r.request_id))
    scheduler.running.remove(twin)
    scheduler._preempt_request(twin, time.monotonic())
    out = None
    for _ in range(MAX_ENGINE_STEPS):
        finished = [o for o in engine.step() if o.finished]
        if finished:
            out = finished[0]
            break
    assert out is not None
    assert (owner.num_preemptions, twin.num_preemptions) == (1, 1)
    assert list(out.outputs[0].token_ids) == llada_generate(
        ref.logits, prompt, ref.spec.mask_token_id, GEN, STEPS, BLOCK, cfg_scale=1.0)


def test_dare_reuse_is_unchanged_by_waiting_aborts_and_recycled_blocks(small_kv_engine):
    """With reuse on, a request's tokens and reuse counts do not depend on when it
    ran or whose blocks it got: run under KV pressure, with one request aborted
    while it runs (it ends as aborted, without an output, and its blocks go to a
    waiting one, holding its stale K/V/O/Q_ref), each other request gives what it
    gives when run alone."""
    from vllm.v1.request import RequestStatus

    llm = small_kv_engine()
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    alone = [_run_engine(llm, [(i, _params())])[0] for i in ids]
    rids = [f"recycle-{k}-{time.monotonic_ns()}" for k in range(len(ids))]
    # (the scheduler knows a request by the engine's internal id)
    internal = [engine.add_request(rid, {"prompt_token_ids": prompt}, _params())
                for rid, prompt in zip(rids, ids)]
    outs = {}
    for _ in range(6):
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    victim = scheduler.requests[internal[0]]
    assert victim in scheduler.running and scheduler.waiting  # running, others wait
    held = set(scheduler.kv_cache_manager.get_block_ids(internal[0])[0])
    assert held
    engine.abort_request([rids[0]])
    assert victim.status == RequestStatus.FINISHED_ABORTED
    assert internal[0] not in scheduler.requests
    # Its blocks are back in the pool or already serve a waiting request.
    owned = {b for r in scheduler.running
             for b in scheduler.kv_cache_manager.get_block_ids(r.request_id)[0]}
    assert pool.get_num_free_blocks() == USABLE_BLOCKS - len(owned)
    recycled = set()
    for _ in range(MAX_ENGINE_STEPS):
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
        recycled |= held & {b for r in scheduler.running
                            for b in scheduler.kv_cache_manager.get_block_ids(r.request_id)[0]}
        if len(outs) == len(ids) - 1:
            break
    assert rids[0] not in outs
    assert recycled  # a waiting request got the aborted one's blocks
    for k in range(1, len(ids)):
        got, want = outs[rids[k]], alone[k]
        assert list(got.outputs[0].token_ids) == list(want.outputs[0].token_ids), k
        assert got.kv_transfer_params["dare"] == want.kv_transfer_params["dare"], k
        assert got.kv_transfer_params["dare"]["kv_reused"] > 0
    assert pool.get_num_free_blocks() == USABLE_BLOCKS


def test_guidance_needs_two_request_slots(engines, tiny_llada, caplog):
    """With max_num_seqs 1 a guided request can never run with its twin: it is
    rejected, and unguided requests are served."""
    llm = engines.get(tiny_llada, max_num_seqs=1)
    caplog.set_level("ERROR", logger="vllm_dare")
    prompt = llm.get_tokenizer().encode(PROMPTS[0])
    outs = _run_engine(llm, [(prompt, _params(dllm_cfg_scale=1.0)), (prompt, _params())])
    assert outs[0].outputs[0].finish_reason == "error"
    assert "runs as two sequences" in caplog.text and "max_num_seqs is 1" in caplog.text
    assert len(outs[1].outputs[0].token_ids) == GEN


def test_running_requests_that_lose_their_blocks_preempt_from_the_end(
    small_kv_engine, tiny_llada
):
    """If the blocks a running request still needs are gone (taken here straight
    from the pool, standing in for anything that outgrew its estimate), requests
    are preempted from the end of the queue, whole, until the others fit; the
    preempted one restarts when blocks come back. Three requests of 2 blocks each
    run together; after their prompt passes 3 of the 4 free blocks are taken, so
    the first keeps its block, the third is preempted to make room for the second."""
    llm = small_kv_engine()
    ref = load_reference_model(tiny_llada)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    prompt = llm.get_tokenizer().encode(PROMPTS[3])
    params = SamplingParams(max_tokens=16, ignore_eos=True,
                            extra_args={"dllm_steps": 16, "dllm_block_length": 8,
                                        "dare_mode": "off"})
    for k in range(3):
        engine.add_request(f"lose-{k}-{time.monotonic_ns()}", {"prompt_token_ids": prompt},
                           params)
    engine.step()  # the three prompt passes
    requests = list(scheduler.running)
    assert len(requests) == 3 and pool.get_num_free_blocks() == 4
    taken = pool.get_new_blocks(3)
    engine.step()
    assert [r.num_preemptions for r in requests] == [0, 0, 1]
    assert requests[2] not in scheduler.running
    pool.free_blocks(taken)
    outs = []
    for _ in range(MAX_ENGINE_STEPS):
        outs += [o for o in engine.step() if o.finished]
        if len(outs) == 3:
            break
    want = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 16, 8)
    assert [list(o.outputs[0].token_ids) for o in outs] == [want] * 3


def sampler_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model_state.sampler


def _worker_state(llm) -> dict[str, int]:
    """Sizes of the worker's per-request bookkeeping (in-process engine)."""
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    state, sampler = runner.model_state, runner.model_state.sampler
    dare = sampler.dare
    return {"slots": len(state._slot_of), "dare_prev_inputs": len(dare._prev_inputs),
            "dare_forwards": len(dare._forwards), "denoisers": len(sampler.states),
            "req_ids": len(sampler.req_id_of_slot), "dare_settings": len(dare.settings),
            "dare_counts": len(dare.counts), "nfe": len(sampler.forwards),
            "cache_policies": len(sampler.policies), "computed_rows": len(sampler.computed_rows),
            "streamed": len(sampler.streamed)}


def test_aborted_requests_free_their_blocks_twins_and_worker_state(small_kv_engine):
    """Aborting running requests (a guided one with its twin, and a DARE one
    that streams) gives every KV-cache block back and leaves no per-request
    state in the scheduler or the worker; the engine then serves as before."""
    llm = small_kv_engine()
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    ids = [llm.get_tokenizer().encode(p) for p in (PROMPTS[0], PROMPTS[3])]
    rids = [f"abort-{k}-{time.monotonic_ns()}" for k in range(2)]

    def params(stream=False, **extra):  # 16 positions: the pair and the other fit in 6 blocks
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        return SamplingParams(max_tokens=16, ignore_eos=True, output_kind=kind,
                              extra_args={"dllm_steps": 16, "dllm_block_length": 8, **extra})

    engine.add_request(rids[0], {"prompt_token_ids": ids[0]}, params(dllm_cfg_scale=1.0))
    engine.add_request(rids[1], {"prompt_token_ids": ids[1]},
                       params(stream=True, dare_mode="kv+o"))
    for _ in range(3):
        assert not any(o.finished for o in engine.step())
    assert _worker_state(llm)["streamed"] == 1
    assert len(scheduler.running) == 3  # the guided request, its twin, the DARE one
    assert any(is_cfg_twin(r.request_id) for r in scheduler.running)
    assert pool.get_num_free_blocks() < USABLE_BLOCKS
    assert _worker_state(llm)["denoisers"] == 3
    engine.abort_request(rids)
    engine.step()  # the worker hears of the finished requests at the next step
    assert not scheduler.requests and not scheduler.running and not scheduler._twins
    assert not scheduler._stream.sent
    assert pool.get_num_free_blocks() == USABLE_BLOCKS
    assert set(_worker_state(llm).values()) == {0}, _worker_state(llm)
    assert not sampler_of(llm).plan_failures
    # A request that finishes normally leaves the worker at the engine's next
    # step (vLLM tells the worker with the next step's scheduler output), so an
    # idle engine holds at most the last step's finished requests, never more.
    for _ in range(2):
        outs = _run_engine(llm, [(ids[1], _params(dare_mode="kv+o"))])
        assert len(outs[0].outputs[0].token_ids) == GEN
        # (SamplingParams' default output_kind, CUMULATIVE, streams)
        assert set(_worker_state(llm).values()) == {1}, _worker_state(llm)
