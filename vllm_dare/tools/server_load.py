"""A mixed concurrent load for a vllm-dare OpenAI server, and its checks.

Used by the load-and-fault test (``tests/test_server_load.py``) and the load
benchmark (``benchmarks/server_load.py``). Every request is one of these kinds:

* ``greedy``: a held-out task question on the chat endpoint, greedy, with one of
  several knob sets (exact mode, DARE K/V+O reuse, classifier-free guidance,
  several blocks, no ``max_tokens`` at all, a ``max_tokens`` past
  ``max_model_len``); completes, and its text must equal the same request's text
  when it runs alone;
* ``stream``: the same, streamed; the joined chunks must equal the text alone;
* ``completion``: the raw completions endpoint, greedy;
* ``abandoned``: a stream the client closes after its first chunk;
* ``timeout``: a request the client gives up on after a fraction of a second;
* ``bad_knob`` / ``unknown_knob`` / ``long_prompt``: invalid requests, each must
  be an HTTP 400 whose message gives the reason.

``Server`` starts ``vllm-dare serve`` on 127.0.0.1 for them. Only addresses on
this machine are targets: the server under test runs here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from vllm_dare.training.tasks import TASKS, held_out

KINDS = ("greedy", "stream", "completion", "abandoned", "timeout",
         "bad_knob", "unknown_knob", "long_prompt")
# Relative frequencies of the kinds in a mix.
DEFAULT_WEIGHTS = {"greedy": 10, "stream": 2, "completion": 2, "abandoned": 2,
                   "timeout": 1, "bad_knob": 1, "unknown_knob": 1, "long_prompt": 1}
# Knob sets of the greedy requests (vllm_xargs; "max_tokens" is taken out).
KNOB_SETS = (
    {"dllm_block_length": 8},
    {"dllm_block_length": 8, "dare_mode": "kv+o"},
    {"dllm_block_length": 8, "dllm_cfg_scale": 1.0},
    {"dllm_block_length": 8, "dare_mode": "kv", "dllm_steps": "half"},
    {"dllm_block_length": 8, "dllm_cache": "dual", "dare_mode": "kv+o"},
    {"dllm_block_length": 8, "dllm_cache": "dkv_decode"},
    {"max_tokens": None},  # the served default
    {"max_tokens": "near_max_model_len"},  # capped at what max_model_len leaves
)
# Invalid requests and the reason their 400 must give.
EXPECTED_400 = {
    "bad_knob": "must be a multiple of the block length",
    "unknown_knob": "unknown diffusion knob 'dllm_stepz'",
    "long_prompt": "maximum context length",
}


@dataclass(frozen=True)
class LoadRequest:
    kind: str
    endpoint: str  # "chat" or "completions"
    body: dict  # JSON body, without "model"

    def key(self) -> str:
        """Identity of the request's content (for the run-alone comparison)."""
        return json.dumps([self.endpoint, _unstreamed(self.body)], sort_keys=True)


def _unstreamed(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


@dataclass
class LoadResult:
    request: LoadRequest
    status: int | None  # HTTP status; None if the client gave up first
    text: str | None = None
    error: str | None = None
    latency: float = 0.0
    completion_tokens: int = 0
    finish_reason: str | None = None


def make_requests(n: int, seed: int = 0, weights: dict | None = None,
                  max_model_len: int = 128) -> list[LoadRequest]:
    """``n`` requests of the mixed kinds, in a random but reproducible order."""
    rng = random.Random(seed)
    weights = weights or DEFAULT_WEIGHTS
    kinds = [k for k in KINDS if weights.get(k)]
    questions = [(task, ex.question) for task in TASKS for ex in held_out(task, 8)]
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        task, question = rng.choice(questions)
        gen = TASKS[task].gen_length
        xargs = dict(rng.choice(KNOB_SETS))
        max_tokens = xargs.pop("max_tokens", gen)
        if max_tokens == "near_max_model_len":  # prompt + max_tokens > max_model_len
            max_tokens = max_model_len - 8
        if xargs.get("dllm_steps") == "half":
            xargs["dllm_steps"] = gen // 2
        body = {"messages": [{"role": "user", "content": question}], "temperature": 0}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if xargs:
            body["vllm_xargs"] = xargs
        endpoint = "chat"
        if kind in ("stream", "abandoned"):
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        elif kind == "completion":
            endpoint = "completions"
            body = {"prompt": question, "max_tokens": gen, "temperature": 0,
                    "vllm_xargs": {"dllm_block_length": 8}}
        elif kind == "bad_knob":
            body["max_tokens"] = gen
            body["vllm_xargs"] = {"dllm_block_length": 5}
        elif kind == "unknown_knob":
            body["vllm_xargs"] = {"dllm_stepz": 4}
        elif kind == "long_prompt":
            body["messages"] = [{"role": "user", "content": "9" * (max_model_len + 8)}]
        out.append(LoadRequest(kind, endpoint, body))
    return out


def _url(base: str, endpoint: str) -> str:
    return f"{base}/v1/chat/completions" if endpoint == "chat" else f"{base}/v1/completions"


def send(base: str, model: str, request: LoadRequest, session: requests.Session,
         timeout: float = 600.0) -> LoadResult:
    """Send one request and read its answer as its kind asks."""
    body = {"model": model, **request.body}
    url = _url(base, request.endpoint)
    start = time.perf_counter()
    result = LoadResult(request, None)
    try:
        if request.kind == "timeout":
            try:
                r = session.post(url, json=body, timeout=0.3)
            except requests.exceptions.Timeout:
                return result  # the client gave up; the server aborts the request
            result.status = r.status_code
            return result
        if request.body.get("stream"):
            with session.post(url, json=body, stream=True, timeout=timeout) as r:
                result.status = r.status_code
                if r.status_code != 200:
                    result.error = r.text
                    return result
                pieces = []
                for line in r.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    data = line[len(b"data: "):]
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or {}
                    result.completion_tokens = usage.get("completion_tokens",
                                                         result.completion_tokens)
                    for choice in chunk.get("choices", []):
                        pieces.append(_chunk_text(choice))
                        result.finish_reason = choice.get("finish_reason") or result.finish_reason
                    if request.kind == "abandoned":
                        return result  # closed after the first chunk
                result.text = "".join(pieces)
        else:
            r = session.post(url, json=body, timeout=timeout)
            result.status = r.status_code
            if r.status_code != 200:
                result.error = r.text
                return result
            payload = r.json()
            choice = payload["choices"][0]
            result.text = _chunk_text(choice)
            result.finish_reason = choice.get("finish_reason")
            result.completion_tokens = payload.get("usage", {}).get("completion_tokens", 0)
    finally:
        result.latency = time.perf_counter() - start
    return result


def _chunk_text(choice: dict) -> str:
    if "message" in choice:
        return choice["message"].get("content") or ""
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


def run_load(base: str, model: str, load: list[LoadRequest], concurrency: int,
             timeout: float = 600.0) -> tuple[list[LoadResult], float]:
    """Send ``load`` with ``concurrency`` clients; returns the results in order
    and the wall time."""
    local = threading.local()

    def one(request: LoadRequest) -> LoadResult:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return send(base, model, request, local.session, timeout)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, load))
    return results, time.perf_counter() - start


def completed_greedy(results: list[LoadResult]) -> list[LoadResult]:
    """Results that ran to the end and whose text is comparable."""
    return [r for r in results
            if r.request.kind in ("greedy", "stream", "completion") and r.status == 200]


def check(results: list[LoadResult], alone: dict[str, str]) -> list[str]:
    """What went wrong (empty if nothing): 5xx, a wrong 400, an output that
    differs from the request run alone (``alone``: key -> text)."""
    problems = []
    for k, r in enumerate(results):
        kind = r.request.kind
        if r.status is not None and r.status >= 500:
            problems.append(f"#{k} {kind}: HTTP {r.status}: {r.error}")
        elif kind in EXPECTED_400:
            if r.status != 400 or EXPECTED_400[kind] not in (r.error or ""):
                problems.append(f"#{k} {kind}: expected a 400 saying "
                                f"{EXPECTED_400[kind]!r}, got {r.status}: {r.error}")
        elif kind in ("greedy", "stream", "completion"):
            if r.status != 200:
                problems.append(f"#{k} {kind}: HTTP {r.status}: {r.error}")
            elif r.text != alone.get(r.request.key()):
                problems.append(f"#{k} {kind}: {r.text!r} != alone "
                                f"{alone.get(r.request.key())!r} ({r.request.body})")
        elif kind == "abandoned" and r.status != 200:
            problems.append(f"#{k} abandoned stream: HTTP {r.status}: {r.error}")
    return problems


def run_alone(base: str, model: str, results: list[LoadResult]) -> dict[str, str]:
    """Each distinct completed request, sent again with nothing else running."""
    alone: dict[str, str] = {}
    session = requests.Session()
    for r in completed_greedy(results):
        key = r.request.key()
        if key in alone:
            continue
        solo = LoadRequest("greedy" if r.request.endpoint == "chat" else "completion",
                           r.request.endpoint,
                           _unstreamed(r.request.body))
        got = send(base, model, solo, session)
        assert got.status == 200, got.error
        alone[key] = got.text
    return alone


def metric(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets); KeyError if the
    text has no sample of it."""
    total, found = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"{name} is not in /metrics")
    return total


def idle_state(base: str, timeout: float = 30.0) -> dict[str, float]:
    """Running and waiting requests and KV-cache usage from ``/metrics``, once the
    server has settled (aborts are processed at the next engine step)."""
    deadline = time.time() + timeout
    while True:
        text = requests.get(f"{base}/metrics", timeout=30).text
        state = {name: metric(text, f"vllm:{name}")
                 for name in ("num_requests_running", "num_requests_waiting",
                              "kv_cache_usage_perc")}
        if not any(state.values()) or time.time() > deadline:
            return state
        time.sleep(0.5)


@dataclass
class Summary:
    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    p50_latency_s: float
    p95_latency_s: float
    statuses: dict = field(default_factory=dict)


def summarize(results: list[LoadResult], wall: float, concurrency: int) -> Summary:
    done = [r for r in results if r.status == 200 and r.request.kind != "abandoned"]
    latencies = sorted(r.latency for r in done) or [0.0]
    tokens = sum(r.completion_tokens for r in done)
    statuses: dict = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    return Summary(concurrency, len(results), wall, len(done) / wall, tokens / wall,
                   statistics.median(latencies), p95, statuses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_dare_command() -> str:
    """The ``vllm-dare`` console script of this environment."""
    path = os.path.join(os.path.dirname(sys.executable), "vllm-dare")
    return path if os.path.exists(path) else shutil.which("vllm-dare")


class Server:
    """``vllm-dare serve MODEL ARGS`` on 127.0.0.1, its output in ``log``."""

    def __init__(self, model: str, args: list[str], log_path, env_updates=None,
                 start_timeout: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # served as users serve it
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(env_updates or {})
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.cmd = [vllm_dare_command(), "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        start = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log()[-5000:])
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - start > start_timeout:
                self.stop()
                raise RuntimeError("server did not start in time:\n" + self.log()[-5000:])
            time.sleep(1)
        self.start_seconds = time.time() - start

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout: float = 60) -> int:
        """SIGINT (the server's graceful shutdown); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
