"""The OpenAI-compatible server, started as users start it (``vllm-dare serve``)
with the DARE backend (``--attention-backend dare``): completions, chat,
streaming, HTTP 400 for bad diffusion/DARE knobs with the server still serving
afterwards, the DARE counters in ``/metrics`` with no extra set-up, and OpenAI
``temperature``/``seed`` through the project's middleware (lm-eval against a
server: ``test_lm_eval.py``)."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from vllm_dare.reference import llada_generate, load_reference_model
from vllm_dare.tools.server_load import Server


@pytest.fixture(scope="module")
def server(tiny_llada, engines, tmp_path_factory):
    engines.close()  # one engine at a time on a 2-core machine
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = Server(str(tiny_llada), [
        "--served-model-name", "tiny-llada",
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
        "--attention-backend", "dare",
        # exact by default; requests opt into reuse with dare_* knobs
        "--additional-config", '{"dare": {"mode": "off"}}',
        # on the CPU build this is the share of the NUMA node's memory vLLM may
        # take; stay modest so the test also runs next to other work
        "--gpu-memory-utilization", "0.4",
    ], log, env_updates={"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield srv.base
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none")


XARGS = {"vllm_xargs": {"dllm_steps": 8, "dllm_block_length": 8}}


def _reference(tiny_llada, prompt_ids, steps=8, cfg_scale=0.0):
    """The reference canvas of 16 tokens (block 8), cut after its first EOS as the
    server's output is."""
    ref = load_reference_model(tiny_llada)
    canvas = llada_generate(ref.logits, list(prompt_ids), ref.spec.mask_token_id, 16, steps, 8,
                            cfg_scale=cfg_scale)
    eos = json.loads((tiny_llada / "config.json").read_text())["eos_token_id"]
    return canvas[: canvas.index(eos) + 1] if eos in canvas else canvas


def test_completion(client, tiny_llada):
    out = client.completions.create(model="tiny-llada", prompt="12+34=", max_tokens=16,
                                    extra_body={"return_token_ids": True, **XARGS})
    choice = out.choices[0]
    want = _reference(tiny_llada, choice.prompt_token_ids)
    assert list(choice.token_ids) == want
    assert choice.finish_reason == ("length" if len(want) == 16 else "stop")
    assert out.usage.completion_tokens == len(want)
    assert choice.text  # detokenized


def test_completion_tokens_equal_the_reference_generation(client, tiny_llada):
    """Exactness through HTTP: the server (DARE backend, mode off) returns the same
    tokens as the pure-PyTorch reference generation for the same prompt ids."""
    ref = load_reference_model(tiny_llada)
    prompts = [[25, 37, 42, 29, 33], [88, 52, 47, 47, 101, 64, 72, 30, 59]]
    out = client.completions.create(
        model="tiny-llada", prompt=prompts, max_tokens=16,
        extra_body={"ignore_eos": True, "return_token_ids": True,
                    "vllm_xargs": {"dllm_steps": 16, "dllm_block_length": 8}},
    )
    got = {c.index: list(c.token_ids) for c in out.choices}
    want = [llada_generate(ref.logits, p, ref.spec.mask_token_id, 16, 16, 8) for p in prompts]
    assert [got[i] for i in range(len(prompts))] == want


def test_chat_completion(client, tiny_llada):
    """The chat template is applied (the prompt ids are the template's) and the
    answer is the reference generation's."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hello"}]
    out = client.chat.completions.create(
        model="tiny-llada", messages=messages, max_tokens=16,
        extra_body={"return_token_ids": True, **XARGS},
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    tok = AutoTokenizer.from_pretrained(tiny_llada)
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    assert list(out.prompt_token_ids) == list(prompt_ids)
    want = _reference(tiny_llada, prompt_ids)
    assert list(choice.token_ids) == want
    assert out.usage.completion_tokens == len(want)


def test_guided_completion_hides_its_twin(client, tiny_llada):
    """Classifier-free guidance runs an unconditional twin inside the engine: the
    client gets one choice per prompt, each the guided reference generation."""
    xargs = {"vllm_xargs": {"dllm_steps": 8, "dllm_block_length": 8, "dllm_cfg_scale": 1.0}}
    out = client.completions.create(
        model="tiny-llada", prompt=["12+34=", "hello"], max_tokens=16,
        extra_body={"return_token_ids": True, **xargs},
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    for c in out.choices:
        assert list(c.token_ids) == _reference(tiny_llada, c.prompt_token_ids, cfg_scale=1.0)


def test_streaming_sends_committed_blocks_before_the_end(client):
    """A stream carries the canvas's committed prefix while the request is still
    denoising (block 8 of 16 tokens, 4 steps per block: the first block is final
    half-way), and adds up to the non-streamed output, on both endpoints."""
    body = {"ignore_eos": True, "return_token_ids": True, **XARGS}
    kwargs = dict(model="tiny-llada", prompt="abc", max_tokens=16, extra_body=body)
    full = client.completions.create(**kwargs).choices[0]
    assert len(full.token_ids) == 16
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)
              if c.choices]
    with_tokens = [c for c in chunks if c.token_ids]
    assert len(with_tokens) >= 2
    assert with_tokens[0].finish_reason is None
    assert [t for c in chunks for t in (c.token_ids or [])] == list(full.token_ids)
    assert "".join(c.text for c in chunks) == full.text

    chat = dict(model="tiny-llada", messages=[{"role": "user", "content": "hello"}],
                max_tokens=16, extra_body={"ignore_eos": True, **XARGS})
    whole = client.chat.completions.create(**chat).choices[0].message.content
    deltas = [c.choices[0].delta.content for c in
              client.chat.completions.create(stream=True, **chat) if c.choices]
    assert sum(1 for d in deltas if d) >= 2
    assert "".join(d or "" for d in deltas) == whole


@pytest.mark.parametrize(
    "xargs,message",
    [
        ({"dllm_block_length": 5}, "multiple of the block length"),
        ({"dllm_remasking": "nope"}, "dllm_remasking must be one of"),
        ({"dllm_steps": -1}, "dllm_steps must be a positive integer"),
        ({"dllm_unknown": 1}, "unknown diffusion knob"),
        ({"dare_mode": "fast"}, "dare mode must be one of"),
        ({"dare_tau_kv": -0.5}, "dare tau_kv must be a number >= 0"),
    ],
)
def test_bad_knobs_are_http_400_and_server_keeps_serving(server, client, xargs, message):
    r = requests.post(
        server + "/v1/completions",
        json={"model": "tiny-llada", "prompt": "hi", "max_tokens": 16, "vllm_xargs": xargs},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    out = client.completions.create(model="tiny-llada", prompt="hi", max_tokens=8)
    assert out.usage.completion_tokens > 0


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_dare_counters_in_prometheus_metrics(server):
    """The engine-wide DARE counters grow by exactly the request's own counts."""
    before = requests.get(server + "/metrics", timeout=30).text
    xargs = {"dllm_steps": 8, "dllm_block_length": 8,
             "dare_mode": "kv+o", "dare_tau_kv": 0.5, "dare_tau_o": 0.5}
    r = requests.post(server + "/v1/completions", timeout=120, json={
        "model": "tiny-llada", "prompt": "reuse me", "max_tokens": 8, "ignore_eos": True,
        "vllm_xargs": xargs})
    assert r.status_code == 200, r.text
    body = r.json()
    after = requests.get(server + "/metrics", timeout=30).text

    def delta(name):
        return _metric_sum(after, name) - _metric_sum(before, name)

    dare = body["kv_transfer_params"]["dare"]
    P = body["usage"]["prompt_tokens"]
    # The prompt-only forward, then 8 whole-sequence forwards, in 2 layers.
    assert dare["token_layers"] == (P + 8 * (P + 8)) * 2
    assert delta("vllm_dare:attention_rows_total") == dare["token_layers"]
    assert delta("vllm_dare:kv_rows_reused_total") == dare["kv_reused"] > 0
    assert delta("vllm_dare:o_rows_reused_total") == dare["o_reused"] > 0
    assert 'layer="1"' in after and 'model_name="tiny-llada"' in after
    # vLLM's own metrics are still served next to ours.
    assert "vllm:num_requests_running" in after


def test_cache_policy_rows_in_prometheus_metrics(server):
    """The rows a cache policy computes and the rows an exact forward would have
    computed reach /metrics, and match the request's own figures."""
    before = requests.get(server + "/metrics", timeout=30).text
    r = requests.post(server + "/v1/completions", timeout=120, json={
        "model": "tiny-llada", "prompt": "cache me", "max_tokens": 16, "ignore_eos": True,
        "vllm_xargs": {"dllm_steps": 16, "dllm_block_length": 8, "dllm_cache": "dual"}})
    assert r.status_code == 200, r.text
    body = r.json()
    after = requests.get(server + "/metrics", timeout=30).text

    def delta(name):
        return _metric_sum(after, name) - _metric_sum(before, name)

    P, layers = body["usage"]["prompt_tokens"], 2
    figures = body["kv_transfer_params"]["dllm"]
    # The prompt pass, then per block of 8 one full forward and 7 of the block.
    assert figures["computed_rows"] == (P + 2 * (P + 16) + 2 * 7 * 8) * layers
    assert delta("vllm_dare:computed_rows_total") == figures["computed_rows"]
    assert delta("vllm_dare:scheduled_rows_total") == (P + 16 * (P + 16)) * layers


def test_per_request_figures_come_back_in_the_response(server):
    """vLLM's CPU platform runs the server's worker in a child process of the
    engine core (multiprocess executor): the figures cross processes
    (``vllm_compat``'s worker-to-scheduler channel) and arrive as the response's kv_transfer_params."""
    xargs = {"dllm_steps": 8, "dllm_block_length": 8,
             "dare_mode": "kv+o", "dare_tau_kv": 0.5, "dare_tau_o": 0.5}
    r = requests.post(server + "/v1/completions", timeout=120, json={
        "model": "tiny-llada", "prompt": ["reuse me", "and me"], "max_tokens": 8,
        "ignore_eos": True, "vllm_xargs": xargs})
    assert r.status_code == 200
    figures = r.json()["kv_transfer_params"]
    assert figures["dllm"]["gen_length"] == 8
    assert figures["dllm"]["forwards"] == figures["dllm"]["denoising_steps"] + 1 > 1
    dare = figures["dare"]
    assert dare["num_layers"] == 2
    assert 0 < dare["kv_reused"] <= dare["token_layers"]
    assert dare["kv_reuse_fraction"] == dare["kv_reused"] / dare["token_layers"]


def test_openai_temperature_and_seed_map_to_denoising_knobs(client):
    kwargs = dict(model="tiny-llada", prompt="sample me", max_tokens=16,
                  extra_body={"vllm_xargs": {"dllm_steps": 16}})
    greedy = client.completions.create(temperature=0, seed=3, **kwargs).choices[0].text
    assert greedy == client.completions.create(**kwargs).choices[0].text  # default: greedy
    a = client.completions.create(temperature=1.0, seed=11, **kwargs).choices[0].text
    b = client.completions.create(temperature=1.0, seed=11, **kwargs).choices[0].text
    c = client.completions.create(temperature=1.0, seed=12, **kwargs).choices[0].text
    assert a == b  # the request's own generator: reproducible
    assert a != c  # and the seed is really used


def test_sampling_knob_given_twice_is_http_400(server):
    r = requests.post(
        server + "/v1/completions",
        json={"model": "tiny-llada", "prompt": "hi", "max_tokens": 8, "seed": 1,
              "vllm_xargs": {"dllm_seed": 2}},
        timeout=60,
    )
    assert r.status_code == 400
    assert "either 'seed' or vllm_xargs.dllm_seed" in r.json()["error"]["message"]
