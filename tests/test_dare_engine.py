"""The DARE backend in the engine: with nothing reused it equals exact mode token
for token; with reuse on it is deterministic, really skips work (counted per
request), and honours per-request overrides; bad DARE knobs are rejected."""

from __future__ import annotations

import re

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_dare.reference import dream_generate, llada_generate, load_reference_model

PROMPTS = ["hello world", "12+34=", "a much longer prompt that spans several dozen tokens", "x"]


def _dare(engines, path, mode="kv+o", tau=0.05, **extra):
    config = {"dare": {"mode": mode, "tau_kv": tau, "tau_o": tau, **extra}}
    return engines.get(path, attention_backend="dare", additional_config=config)


def _run(llm, ids, max_tokens, extra):
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)


@pytest.mark.parametrize("mode,tau", [("off", 0.05), ("kv+o", 0.0)])
def test_llada_nothing_reused_equals_exact(engines, tiny_llada, mode, tau):
    llm = _dare(engines, tiny_llada, mode, tau)
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    outs = _run(llm, ids, 16, {"dllm_steps": 16, "dllm_block_length": 8})
    for prompt, out in zip(ids, outs):
        want = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 16, 8)
        assert list(out.outputs[0].token_ids) == want
        stats = out.kv_transfer_params["dare"]
        assert stats["kv_reused"] == stats["o_reused"] == 0
        assert stats["token_layers"] > 0


def test_llada_reuse_is_deterministic_and_counted(engines, tiny_llada):
    llm = _dare(engines, tiny_llada, "kv+o", 0.05)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 16, "dllm_block_length": 8}
    first = _run(llm, ids, 16, extra)
    second = _run(llm, ids, 16, extra)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    for out in first:
        stats = out.kv_transfer_params["dare"]
        assert 0 < stats["kv_reused"] < stats["token_layers"]
        assert 0 < stats["o_reused"] < stats["token_layers"]
        assert stats["kv_reuse_fraction"] == stats["kv_reused"] / stats["token_layers"]


def test_per_request_overrides(engines, tiny_llada):
    llm = _dare(engines, tiny_llada, "kv+o", 0.05)
    ref = load_reference_model(tiny_llada)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:2]]
    base = {"dllm_steps": 16, "dllm_block_length": 8}
    off = _run(llm, ids, 16, {**base, "dare_mode": "off"})
    for prompt, out in zip(ids, off):
        assert list(out.outputs[0].token_ids) == llada_generate(
            ref.logits, prompt, ref.spec.mask_token_id, 16, 16, 8
        )
        assert out.kv_transfer_params["dare"]["kv_reused"] == 0
    kv_only = _run(llm, ids, 16, {**base, "dare_mode": "kv"})
    for out in kv_only:
        stats = out.kv_transfer_params["dare"]
        assert stats["kv_reused"] > 0 and stats["o_reused"] == 0
    o_only = _run(llm, ids, 16, {**base, "dare_mode": "o", "dare_tau_o": 0.2})
    for out in o_only:
        stats = out.kv_transfer_params["dare"]
        assert stats["o_reused"] > 0 and stats["kv_reused"] == 0
    # A refresh every step leaves nothing to reuse.
    refreshed = _run(llm, ids, 16, {**base, "dare_refresh_interval": 1})
    assert all(o.kv_transfer_params["dare"]["kv_reused"] == 0 for o in refreshed)


def test_recompute_candidates_forces_exactly_the_blocks_masked_positions(engines, tiny_llada):
    """With tau above any query delta every row that is not forced is reused, so
    recomputing the candidates costs exactly their number. Gen 16, block 8, 16 steps
    (one token per step): in each block the first forward refreshes everything, and
    the 7 others see 7, 6, ..., 1 still-masked positions in the block (the token
    unmasked by the previous step is forced anyway and no longer masked): 28 rows
    per block and layer."""
    llm = _dare(engines, tiny_llada, "kv+o", 0.05)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    base = {"dllm_steps": 16, "dllm_block_length": 8, "dare_tau_kv": 1e6, "dare_tau_o": 1e6}
    plain = _run(llm, ids, 16, base)
    guarded = _run(llm, ids, 16, {**base, "dare_recompute_candidates": True})
    for p, g in zip(plain, guarded):
        ps, gs = p.kv_transfer_params["dare"], g.kv_transfer_params["dare"]
        assert ps["token_layers"] == gs["token_layers"]
        for key in ("kv_reused", "o_reused"):
            assert ps[key] - gs[key] == 2 * 28 * gs["num_layers"], key


def test_candidate_limit_forces_at_most_that_many_per_step(engines, tiny_llada):
    """As above, with at most 2 candidates per forward: the 7 forwards after a block
    start recompute min(2, n) of their n = 7, 6, ..., 1 masked positions, 13 rows per
    block and layer."""
    llm = _dare(engines, tiny_llada, "kv+o", 0.05)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    base = {"dllm_steps": 16, "dllm_block_length": 8, "dare_tau_kv": 1e6, "dare_tau_o": 1e6}
    plain = _run(llm, ids, 16, base)
    limited = _run(llm, ids, 16, {**base, "dare_recompute_candidates": True,
                                  "dare_candidate_limit": 2})
    for p, g in zip(plain, limited):
        ps, gs = p.kv_transfer_params["dare"], g.kv_transfer_params["dare"]
        for key in ("kv_reused", "o_reused"):
            assert ps[key] - gs[key] == 2 * 13 * gs["num_layers"], key


def test_guidance_twin_follows_its_owners_blocks_and_candidates(engines, tiny_llada):
    """A guided request runs an unconditional twin whose logits steer the owner's
    step: the twin refreshes at the owner's block starts and recomputes the owner's
    candidates. With tau above any delta, recomputing the candidates then costs 28
    rows per block and layer for each of the two (see the test above), counted in
    the engine-wide per-layer totals."""
    from vllm_dare.cache_policies import dare_counters

    llm = _dare(engines, tiny_llada, "kv+o", 0.05)
    ids = [llm.get_tokenizer().encode(PROMPTS[1])]
    base = {"dllm_steps": 16, "dllm_block_length": 8, "dllm_cfg_scale": 1.0,
            "dare_tau_kv": 1e6, "dare_tau_o": 1e6}

    def reused(extra):
        before = dare_counters.layer_totals()
        _run(llm, ids, 16, extra)
        return dare_counters.layer_totals() - before

    plain = reused(base)
    guarded = reused({**base, "dare_recompute_candidates": True})
    num_layers = plain.shape[0]
    assert (plain[:, 0] == guarded[:, 0]).all()  # same rows processed
    for column in (1, 2):  # K/V reused, O reused
        assert plain[:, column].sum() - guarded[:, column].sum() == 2 * 2 * 28 * num_layers


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"dare_mode": "sometimes"}, "dare mode must be one of"),
        ({"dare_tau_kv": -1}, "dare tau_kv must be a number >= 0"),
        ({"dare_refresh_interval": 1.5}, "refresh_interval must be an integer"),
        ({"dare_tau": 0.1}, "unknown DARE knob 'dare_tau'"),
        ({"dare_recompute_candidates": "yes"}, "recompute_candidates must be true or false"),
        ({"dare_recompute_candidates": True, "dare_candidate_limit": -1},
         "candidate_limit must be an integer >= 0"),
        ({"dare_candidate_limit": 2}, "candidate_limit limits recompute_candidates, which is off"),
    ],
)
def test_bad_dare_knobs_are_rejected(engines, tiny_llada, extra, message):
    llm = _dare(engines, tiny_llada, "kv+o", 0.05)
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate("hi", SamplingParams(max_tokens=8, extra_args=extra), use_tqdm=False)
    assert llm.generate("hi", SamplingParams(max_tokens=8), use_tqdm=False)[0].outputs[0].token_ids


def test_dream_nothing_reused_equals_exact(engines, tiny_dream):
    llm = _dare(engines, tiny_dream, "off")
    ref = load_reference_model(tiny_dream)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    outs = _run(llm, ids, 16, {"dllm_steps": 16, "dllm_alg": "entropy"})
    for prompt, out in zip(ids, outs):
        want = dream_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 16, alg="entropy")
        assert list(out.outputs[0].token_ids) == want


def test_dream_reuse_runs_and_counts(engines, tiny_dream):
    llm = _dare(engines, tiny_dream, "kv+o", 0.05)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    outs = _run(llm, ids, 16, {"dllm_steps": 16, "dllm_alg": "entropy"})
    assert all(o.kv_transfer_params["dare"]["kv_reused"] > 0 for o in outs)
    # GQA with max_mode kv: per kv head a slot holds K, V and its query heads' Q_ref
    # (no O), and serves mode kv as the full cache does.
    extra = {"dllm_steps": 16, "dllm_alg": "entropy", "dare_mode": "kv"}
    full_blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    full = _run(llm, ids, 16, extra)
    kv = engines.get(tiny_dream, attention_backend="dare",
                     additional_config={"dare": {"max_mode": "kv", "tau_kv": 0.05}})
    blocks = kv.llm_engine.vllm_config.cache_config.num_gpu_blocks
    per_kv_head = {"kv+o": 2 + 2 * 2, "kv": 2 + 1 * 2}  # in head_dims; 2 queries per kv head
    assert abs(blocks / full_blocks - per_kv_head["kv+o"] / per_kv_head["kv"]) < 0.01
    for a, b in zip(full, _run(kv, ids, 16, extra)):
        assert list(b.outputs[0].token_ids) == list(a.outputs[0].token_ids)
        assert b.kv_transfer_params["dare"] == a.kv_transfer_params["dare"]


def test_max_mode_sizes_the_cache_and_limits_requests(engines, tiny_llada):
    """``max_mode`` kv keeps no O rows and ``off`` neither O nor Q_ref: the same
    KV-cache memory holds more blocks, results are those of the full cache, and a
    request for reuse the cache cannot hold is refused (the engine keeps serving)."""
    from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout

    ref = load_reference_model(tiny_llada)
    H, D = ref.spec.num_heads, ref.spec.head_dim
    width = {m: DareCacheLayout.for_max_mode(H, H, D, m).width for m in ("kv+o", "kv", "off")}
    assert width["kv+o"] > width["kv"] > width["off"] == 2 * H * D  # MHA
    extra = {"dllm_steps": 16, "dllm_block_length": 8, "dare_mode": "kv"}

    def run(llm, mode_extra):
        ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
        return ids, _run(llm, ids, 16, mode_extra)

    full = _dare(engines, tiny_llada, "kv+o", 0.05)
    full_blocks = full.llm_engine.vllm_config.cache_config.num_gpu_blocks
    _, full_kv = run(full, extra)

    kv = engines.get(tiny_llada, attention_backend="dare",
                     additional_config={"dare": {"max_mode": "kv", "tau_kv": 0.05}})
    blocks = kv.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert abs(blocks / full_blocks - width["kv+o"] / width["kv"]) < 0.01, (blocks, full_blocks)
    _, outs = run(kv, extra)
    for a, b in zip(full_kv, outs):
        assert list(b.outputs[0].token_ids) == list(a.outputs[0].token_ids)
        assert b.kv_transfer_params["dare"] == a.kv_transfer_params["dare"]
        assert b.kv_transfer_params["dare"]["kv_reused"] > 0
    for mode in ("kv+o", "o"):
        with pytest.raises(VLLMValidationError, match=f"dare mode '{re.escape(mode)}' needs a DARE cache "
                           "this engine does not keep.*max_mode 'kv'.*modes off, kv"):
            _run(kv, [[5, 6]], 8, {"dare_mode": mode})
    assert kv.generate("hi", SamplingParams(max_tokens=8), use_tqdm=False)[0].outputs[0].token_ids

    off = engines.get(tiny_llada, attention_backend="dare",
                      additional_config={"dare": {"max_mode": "off"}})
    blocks = off.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert abs(blocks / full_blocks - width["kv+o"] / width["off"]) < 0.01, (blocks, full_blocks)
    ids, outs = run(off, {"dllm_steps": 16, "dllm_block_length": 8})
    for prompt, out in zip(ids, outs):
        assert list(out.outputs[0].token_ids) == llada_generate(
            ref.logits, prompt, ref.spec.mask_token_id, 16, 16, 8)
        assert out.kv_transfer_params["dare"]["kv_reused"] == 0
    with pytest.raises(VLLMValidationError, match="max_mode 'off', which serves modes off\\)"):
        _run(off, [[5, 6]], 8, {"dare_mode": "kv"})


@pytest.mark.parametrize("config,message", [
    ({"max_mode": "all"}, "dare max_mode must be one of off, kv, o, kv\\+o, got 'all'"),
    ({"max_mode": "kv", "mode": "kv+o"}, "dare mode 'kv\\+o' needs a DARE cache"),
    ({"max_mode": "off", "mode": "o"}, "max_mode 'off', which serves modes off\\)"),
])
def test_engine_max_mode_errors(config, message):
    from vllm_dare.cache_policies.dare_reuse import DareSettings

    with pytest.raises(ValueError, match=message):
        DareSettings.from_engine_config(config)


def test_engine_mode_defaults_to_max_mode():
    from vllm_dare.cache_policies.dare_reuse import DareSettings

    assert DareSettings.from_engine_config({"max_mode": "kv"}).mode == "kv"
    assert DareSettings.from_engine_config({"max_mode": "kv", "mode": "off"}).mode == "off"
    assert DareSettings.from_engine_config({}).max_mode == "kv+o"


def test_triton_kernels_in_the_engine(engines, tiny_dream, monkeypatch):
    """The engine with the Triton kernels (``VLLM_DARE_KERNELS=triton``; interpreted
    on CPU, what a GPU compiles) on vLLM's own metadata (block tables, slot mapping,
    query_start_loc): with nothing reused it equals the reference, and with reuse on
    it makes the same decisions and tokens as the PyTorch ops the CPU build runs."""
    llm = _dare(engines, tiny_dream, "kv+o", 0.05)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    extra = {"dllm_steps": 16, "dllm_alg": "entropy"}
    torch_ops = _run(llm, ids, 16, extra)
    engines.close()
    monkeypatch.setenv("VLLM_DARE_KERNELS", "triton")
    try:
        llm = _dare(engines, tiny_dream, "kv+o", 0.05)
        from vllm_dare.attention_backends import triton_dare_kernels

        runtime = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.dare_runtime
        assert runtime.ops is triton_dare_kernels
        ref = load_reference_model(tiny_dream)
        off = _run(llm, ids, 16, {**extra, "dare_mode": "off"})
        for prompt, out in zip(ids, off):
            want = dream_generate(ref.logits, prompt, ref.spec.mask_token_id, 16, 16,
                                  alg="entropy")
            assert list(out.outputs[0].token_ids) == want
        triton = _run(llm, ids, 16, extra)
        for a, b in zip(torch_ops, triton):
            assert list(b.outputs[0].token_ids) == list(a.outputs[0].token_ids)
            assert b.kv_transfer_params["dare"] == a.kv_transfer_params["dare"]
            assert b.kv_transfer_params["dare"]["kv_reused"] > 0
    finally:
        engines.close()  # not for the tests that want the PyTorch ops


def test_dare_knobs_need_the_dare_backend(llada_engine):
    llm = llada_engine()
    with pytest.raises(VLLMValidationError, match="need the DARE attention backend"):
        llm.generate("hi", SamplingParams(max_tokens=8, extra_args={"dare_mode": "kv"}),
                     use_tqdm=False)
