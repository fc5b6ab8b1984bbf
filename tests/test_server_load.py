"""The OpenAI server on the packaged default model under a mixed concurrent load
with faults, served as users serve it (``vllm-dare serve``, DARE backend).

A 128-token step budget with 32 request slots means the budget runs out every
step (16 clients, sequences of 40 to 128 tokens): requests must wait whole rather
than be split. The load mixes knobs and modes in one batch (exact mode, DARE
reuse, classifier-free guidance, several block lengths, the default max_tokens, a
max_tokens past max_model_len), streams read to the end, streams abandoned after
their first chunk, requests the client gives up on, and invalid requests.
Afterwards the server must show no request left and an empty KV cache.
"""

from __future__ import annotations

import pytest
import requests
from vllm_dare.tools.server_load import Server

from vllm_dare.default_model import default_model_path
from vllm_dare.tools import server_load

MAX_MODEL_LEN = 128
NUM_REQUESTS = 60
CONCURRENCY = 16


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    engines.close()  # one engine at a time on a 2-core machine
    log = tmp_path_factory.mktemp("load-server") / "server.log"
    srv = Server(default_model_path(), [
        "--served-model-name", "dllm", "--attention-backend", "dare",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_MODEL_LEN),
        "--max-num-seqs", "32",
    ], log, env_updates={"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield srv
    srv.stop()


def test_mixed_load_with_faults_never_fails_the_engine(server):
    load = server_load.make_requests(NUM_REQUESTS, seed=0, max_model_len=MAX_MODEL_LEN)
    assert {r.kind for r in load} == set(server_load.KINDS)
    knob_sets = {str(r.request.body.get("vllm_xargs")) for r in
                 [server_load.LoadResult(q, None) for q in load] if r.request.kind == "greedy"}
    assert len(knob_sets) >= 4
    results, _wall = server_load.run_load(server.base, "dllm", load, CONCURRENCY)
    alone = server_load.run_alone(server.base, "dllm", results)
    problems = server_load.check(results, alone)
    assert not problems, "\n".join(problems)
    completed = server_load.completed_greedy(results)
    assert len(completed) >= NUM_REQUESTS // 2
    assert server_load.idle_state(server.base) == {
        "num_requests_running": 0.0, "num_requests_waiting": 0.0,
        "kv_cache_usage_perc": 0.0}
    log = server.log()
    assert "Traceback" not in log and "EngineDeadError" not in log
    # The server still answers.
    r = requests.post(server.base + "/v1/chat/completions", timeout=120, json={
        "model": "dllm", "messages": [{"role": "user", "content": "words 512"}],
        "max_tokens": 32, "temperature": 0, "vllm_xargs": {"dllm_block_length": 8}})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "five hundred twelve"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_request_without_max_tokens_gets_the_served_canvas(server, endpoint):
    """The served canvas (256) is more than max_model_len leaves after the
    prompt, so the canvas is the rest of max_model_len, on both endpoints."""
    body = {"model": "dllm", "temperature": 0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "words 512"}]
        url = server.base + "/v1/chat/completions"
    else:
        body["prompt"] = "words 512"
        url = server.base + "/v1/completions"
    r = requests.post(url, json=body, timeout=300)
    assert r.status_code == 200, r.text
    payload = r.json()
    prompt_tokens = payload["usage"]["prompt_tokens"]
    assert payload["kv_transfer_params"]["dllm"]["gen_length"] == MAX_MODEL_LEN - prompt_tokens


def test_the_cpu_build_serves_eagerly(server):
    """No torch.compile or CUDA-graph warm-up at start-up on the CPU build: a
    denoising step never has the shapes they would be built for."""
    log = server.log()
    assert "enforce_eager=True" in log
    assert "Compiling a graph" not in log and "torch.compile" not in log.replace(
        "disabling torch.compile", "")


def test_shutdown_is_quiet(server):
    """SIGINT: the server drains, exits 0, and prints no error, traceback or
    leak report (this test runs last in the module)."""
    assert server.stop() == 0
    log = server.log()
    tail = log[log.index("shutdown triggered"):]
    for alarming in ("Traceback", "ERROR", "EngineDeadError", "nanobind", "leaked",
                     "force killing"):
        assert alarming not in tail, tail[-3000:]
