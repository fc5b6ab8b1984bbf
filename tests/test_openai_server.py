"""The OpenAI-compatible server, started as users start it (``vllm-dare serve``)
with the DARE backend (``--attention-backend dare``): completions, chat,
streaming, HTTP 400 for bad diffusion/DARE knobs with the server still serving
afterwards, the DARE counters in ``/metrics`` with no extra set-up, OpenAI
``temperature``/``seed`` through the project's middleware, and lm-eval's
``local-completions`` model on the shipped task configs."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
import requests
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


def test_completion(client):
    out = client.completions.create(model="tiny-llada", prompt="12+34=", max_tokens=16, extra_body=XARGS)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0


def test_completion_tokens_equal_the_reference_generation(client, tiny_llada):
    """Exactness through HTTP: the server (DARE backend, mode off) returns the same
    tokens as the pure-PyTorch reference generation for the same prompt ids."""
    from vllm_dare.reference import llada_generate, load_reference_model

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


def test_chat_completion(client):
    out = client.chat.completions.create(
        model="tiny-llada",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        extra_body=XARGS,
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens > 0


def test_guided_completion_hides_its_twin(client):
    xargs = {"vllm_xargs": {"dllm_steps": 8, "dllm_block_length": 8, "dllm_cfg_scale": 1.0}}
    out = client.completions.create(
        model="tiny-llada", prompt=["12+34=", "hello"], max_tokens=16, extra_body=xargs
    )
    assert len(out.choices) == 2
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)


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


def test_dare_counters_in_prometheus_metrics(server, client):
    before = requests.get(server + "/metrics", timeout=30).text
    xargs = {"vllm_xargs": {"dllm_steps": 8, "dllm_block_length": 8,
                            "dare_mode": "kv+o", "dare_tau_kv": 0.5, "dare_tau_o": 0.5}}
    out = client.completions.create(model="tiny-llada", prompt="reuse me", max_tokens=8,
                                    extra_body=xargs)
    assert out.usage.completion_tokens > 0
    after = requests.get(server + "/metrics", timeout=30).text
    rows = _metric_sum(after, "vllm_dare:attention_rows_total") - _metric_sum(
        before, "vllm_dare:attention_rows_total")
    kv = _metric_sum(after, "vllm_dare:kv_rows_reused_total") - _metric_sum(
        before, "vllm_dare:kv_rows_reused_total")
    o = _metric_sum(after, "vllm_dare:o_rows_reused_total") - _metric_sum(
        before, "vllm_dare:o_rows_reused_total")
    # 9 forwards (8 steps + the prompt-only one) x 2 layers x (prompt + 8 canvas rows)
    assert rows >= 9 * 2 * 8
    assert 0 < kv <= rows and 0 < o <= rows
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


def test_lm_eval_local_completions_runs_the_shipped_tasks(server, tiny_llada, tmp_path):
    from vllm_dare.lm_eval_tasks import TASKS_DIR

    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions",
        "--model_args",
        f"model=tiny-llada,base_url={server}/v1/completions,tokenized_requests=False,"
        "tokenizer_backend=none,num_concurrent=2,max_retries=1",
        "--include_path", TASKS_DIR, "--tasks", "dllm_tasks", "--limit", "3",
        "--metadata", json.dumps({"model_path": str(tiny_llada)}),
        "--output_path", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert results, proc.stdout[-2000:]
    got = results[0]["results"]
    for task in ("dllm_add", "dllm_sort", "dllm_words"):
        assert 0.0 <= got[task]["exact_match,none"] <= 1.0
        assert results[0]["n-samples"][task]["effective"] == 3
