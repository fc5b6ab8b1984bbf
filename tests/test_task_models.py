"""The packaged task models: found without network access, load through the same
code path as the official releases, and answer held-out questions in exact mode
through the vLLM engine as their model cards say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm import SamplingParams

from vllm_dare.default_model import DEFAULT_MODEL_DIR, default_model_path, packaged_model_path
from vllm_dare.training.tasks import TASKS, held_out, is_correct
from vllm_dare.training.train import prompt_ids

PER_TASK = 25


def test_default_model_is_the_trained_llada():
    path = Path(default_model_path())
    assert path == DEFAULT_MODEL_DIR
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"]
    card = json.loads((path / "training.json").read_text())
    assert min(card["heldout_exact_accuracy_reference_fp32"].values()) >= 0.9
    assert (path / "README.md").read_text().startswith("# llada-tasks")
    # small enough to ship
    assert (path / "model.safetensors").stat().st_size < 20 * 2**20


@pytest.mark.parametrize("name,arch", [("llada-tasks", "LLaDAModelLM"), ("dream-tasks", "DreamModel")])
def test_task_model_answers_held_out_questions(engines, name, arch):
    """Greedy, through the engine with the card's decoding: every answer is the
    reference generation's token for token (cut after its first EOS, as served),
    and the accuracy on these questions is the card's within what 25 of its 200
    questions can differ by."""
    from vllm_dare.reference import dream_generate, llada_generate, load_reference_model

    path = packaged_model_path(name)
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["architectures"] == [arch]
    card = json.loads((Path(path) / "training.json").read_text())
    reference = card["heldout_exact_accuracy_reference_fp32"]
    llm = engines.get(path)
    ref = load_reference_model(path)
    tok = llm.get_tokenizer()
    for task, spec in TASKS.items():
        examples = held_out(task)[:PER_TASK]
        gen = spec.gen_length
        # The card's decoding (steps = gen length; LLaDA blocks of 8)
        extra = ({"dllm_steps": gen, "dllm_alg": "maskgit_plus"} if arch == "DreamModel"
                 else {"dllm_steps": gen, "dllm_block_length": 8})
        prompts = [prompt_ids(tok, ex.question) for ex in examples]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=gen, extra_args=extra), use_tqdm=False)
        for k, (prompt, out) in enumerate(zip(prompts, outs)):
            if arch == "DreamModel":
                want = dream_generate(ref.logits, prompt, ref.spec.mask_token_id, gen, gen,
                                      alg="maskgit_plus")
            else:
                want = llada_generate(ref.logits, prompt, ref.spec.mask_token_id, gen, gen, 8)
            if tok.eos_token_id in want:
                want = want[: want.index(tok.eos_token_id) + 1]
            assert list(out.outputs[0].token_ids) == want, (name, task, k)
        correct = sum(is_correct(ex, o.outputs[0].text) for ex, o in zip(examples, outs))
        # The card's accuracy is over all 200 held-out questions; 25 of them hold
        # at most 2 more misses than its share (a model at 0.98 misses 4 in 200).
        assert correct >= reference[task] * PER_TASK - 2, (name, task, correct, reference)


def _words_questions(engines, name, **engine_args):
    """The packaged model's engine (``engine_args``: more ``LLM`` arguments) and
    dense reference, and six held-out questions of its longest task (``words``) as
    prompt token ids."""
    from vllm_dare.reference import load_reference_model

    path = packaged_model_path(name)
    llm = engines.get(path, **engine_args)
    tok = llm.get_tokenizer()
    prompts = [prompt_ids(tok, ex.question) for ex in held_out("words")[:6]]
    return llm, load_reference_model(path), prompts


@pytest.mark.parametrize("name,caches", [
    ("llada-tasks", ["prefix", "dual", "dkv_decode", "freecache"]),
    ("dream-tasks", ["dkv_decode", "dkv_prefill", "dkv_pd", "freecache"]),
])
def test_cache_policies_on_the_packaged_models_equal_their_references(engines, name, caches):
    """Each policy through vLLM equals its dense reference token for token on the
    trained models too (held-out questions of the longest task, batched)."""
    from vllm_dare.reference.dkv_cache import dream_generate_dkv, llada_generate_dkv_decode
    from vllm_dare.reference.fast_dllm_cache import llada_generate_cached
    from vllm_dare.reference.freecache import dream_generate_freecache, llada_generate_freecache

    llm, ref, prompts = _words_questions(engines, name)
    mask, gen = ref.spec.mask_token_id, TASKS["words"].gen_length
    if name == "llada-tasks":
        knobs = {"dllm_steps": gen, "dllm_block_length": 8}
        references = {
            "prefix": lambda p: llada_generate_cached(ref, p, mask, gen, gen, 8, "prefix"),
            "dual": lambda p: llada_generate_cached(ref, p, mask, gen, gen, 8, "dual"),
            "dkv_decode": lambda p: llada_generate_dkv_decode(ref, p, mask, gen, gen, 8),
            "freecache": lambda p: llada_generate_freecache(ref, p, mask, gen, gen, 8),
        }
    else:
        knobs = {"dllm_steps": gen, "dllm_alg": "maskgit_plus"}
        references = {
            "dkv_decode": lambda p: dream_generate_dkv(ref, p, mask, gen, gen, "decode"),
            "dkv_prefill": lambda p: dream_generate_dkv(ref, p, mask, gen, gen, "prefill"),
            "dkv_pd": lambda p: dream_generate_dkv(ref, p, mask, gen, gen, "pd"),
            "freecache": lambda p: dream_generate_freecache(ref, p, mask, gen, gen),
        }
    for cache in caches:
        params = SamplingParams(max_tokens=gen, ignore_eos=True,
                                extra_args={**knobs, "dllm_cache": cache})
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            want, figures = references[cache](prompt)
            assert list(out.outputs[0].token_ids) == want, (name, cache)
            assert out.kv_transfer_params["dllm"]["computed_rows"] == (
                figures["computed_rows"] + len(prompt) * ref.spec.num_layers)


@pytest.mark.parametrize("name", ["llada-tasks", "dream-tasks"])
def test_fast_dllm_rules_on_the_packaged_models_equal_their_references(engines, name):
    """Parallel decoding, Fast-dLLM's block-wise Dream generation with its caches and
    dKV-Cache Greedy equal their references on the trained models (held-out
    questions of the longest task, batched)."""
    import torch

    from vllm_dare.reference.cached_generation import llada_generate_with_cache
    from vllm_dare.reference.dkv_cache import llada_generate_dkv_greedy
    from vllm_dare.reference.fast_dllm_dream import dream_generate_blockwise
    from vllm_dare.reference.parallel_decoding import llada_generate_parallel

    llm, ref, prompts = _words_questions(engines, name)
    mask, gen = ref.spec.mask_token_id, TASKS["words"].gen_length
    threshold = {"dllm_parallel": "threshold", "dllm_threshold": 0.9}
    if name == "llada-tasks":
        def dual(p):
            L = len(p) + gen

            def feed(x, start, end, j):
                return (torch.arange(L) if j == 0 else torch.arange(start, end)), None
            return llada_generate_with_cache(ref, p, mask, gen, gen, 8, feed,
                                             parallel=("threshold", 0.9, 1.0))[0]

        cases = {
            "threshold": ({"dllm_block_length": 8, **threshold},
                          lambda p, k: llada_generate_parallel(ref.logits, p, mask, gen, 8)[0]),
            "dual+threshold": ({"dllm_block_length": 8, "dllm_cache": "dual", **threshold},
                               lambda p, k: dual(p)),
            "dkv_greedy": ({"dllm_block_length": 8, "dllm_steps": gen,
                            "dllm_remasking": "random", "dllm_cache": "dkv_greedy"},
                           lambda p, k: llada_generate_dkv_greedy(
                               ref, p, mask, gen, gen, 8,
                               generator=torch.Generator().manual_seed(k))[0]),
        }
    else:
        blocks = {"dllm_block_length": 8}
        cases = {
            "blocks": ({**blocks, "dllm_steps": gen}, lambda p, k: dream_generate_blockwise(
                ref, p, mask, gen, gen, 8)[0]),
            "blocks+dual": ({**blocks, "dllm_steps": gen, "dllm_cache": "dual"},
                            lambda p, k: dream_generate_blockwise(
                                ref, p, mask, gen, gen, 8, "dual")[0]),
            "blocks+prefix+threshold": (
                {**blocks, "dllm_cache": "prefix", **threshold},
                lambda p, k: dream_generate_blockwise(ref, p, mask, gen, gen, 8, "prefix",
                                                      parallel=("threshold", 0.9, 1.0))[0]),
        }
    for case, (knobs, reference) in cases.items():
        params = [SamplingParams(max_tokens=gen, ignore_eos=True,
                                 extra_args={**knobs, "dllm_seed": k})
                  for k in range(len(prompts))]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for k, (prompt, out) in enumerate(zip(prompts, outs)):
            assert list(out.outputs[0].token_ids) == reference(prompt, k), (name, case, k)


@pytest.mark.parametrize("name", ["llada-tasks", "dream-tasks"])
def test_dare_on_the_packaged_models_equals_its_reference(engines, name):
    """DARE with reuse on equals the DARE reference token for token and in its
    reuse counts on the trained models (held-out questions of the longest task,
    batched): the engine default (kv+o at tau 0.05), and DARE-KV at tau 0.05 alone
    and with candidates limited to 2. With O reused, a token that is not forced
    reuses every layer (its layer-0 query never changes, so neither does any later
    layer's input); in mode kv the predictor refuses rows."""
    from vllm_dare.cache_policies.dare_reuse import DareSettings
    from vllm_dare.reference.dare_generation import dream_generate_dare, llada_generate_dare

    llm, ref, prompts = _words_questions(engines, name, attention_backend="dare")
    mask, gen = ref.spec.mask_token_id, TASKS["words"].gen_length
    kv = {"dare_mode": "kv", "dare_tau_kv": 0.05}
    requests = [{}, kv, {**kv, "dare_recompute_candidates": True, "dare_candidate_limit": 2}] * 2
    knobs = ({"dllm_steps": gen, "dllm_block_length": 8} if name == "llada-tasks"
             else {"dllm_steps": gen, "dllm_alg": "maskgit_plus"})

    def reference(prompt, overrides):
        settings = DareSettings().for_request(overrides)
        if name == "llada-tasks":
            return llada_generate_dare(ref, prompt, mask, gen, gen, 8, settings)
        return dream_generate_dare(ref, prompt, mask, gen, gen, settings, alg="maskgit_plus")

    params = [SamplingParams(max_tokens=gen, ignore_eos=True, extra_args={**knobs, **o})
              for o in requests]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for k, (prompt, out, o) in enumerate(zip(prompts, outs, requests)):
        want, counts = reference(prompt, o)
        assert list(out.outputs[0].token_ids) == want, (name, k)
        got = out.kv_transfer_params["dare"]
        assert {key: got[key] for key in counts} == counts, (name, k)
        assert counts["kv_reused"] > 0
        if o:  # mode kv: the predictor refuses rows
            assert counts["kv_refused"] > 0
        else:  # O reused: every row that is not forced is reused
            assert counts["kv_refused"] == counts["o_refused"] == 0
