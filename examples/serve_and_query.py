"""Serve a diffusion model with vLLM's OpenAI server and query it.

Starts ``vllm-dare serve`` (vLLM's server, set up for diffusion models) with the
DARE backend on the packaged default model (the trained LLaDA-architecture task model, or --model PATH),
asks it one held-out question per task in exact mode and with DARE reuse, asks one
with each of two cache policies (which feed fewer tokens per forward) and with
each parallel-decoding rule (which commit more tokens per forward), streams an
answer, shows the HTTP 400 for a bad knob, and stops the server. Exits non-zero if
an exact-mode answer is wrong.

    .venv/bin/python examples/serve_and_query.py [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import requests

from vllm_dare.default_model import default_model_path
from vllm_dare.training.tasks import TASKS, held_out, is_correct


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with code {proc.returncode}")
        try:
            if requests.get(f"{base}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit("server did not become healthy in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model_path())
    args = parser.parse_args()

    port = free_port()
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU build: KV cache size in GiB
    vllm_dare = os.path.join(os.path.dirname(sys.executable), "vllm-dare")
    cmd = [
        vllm_dare, "serve", args.model, "--served-model-name", "dllm",
        "--max-model-len", "512", "--attention-backend", "dare",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    print("$", " ".join(cmd), flush=True)
    # Own session: the shutdown signal reaches the API server only, which then stops
    # its engine process itself.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wrong = 0
    try:
        wait_healthy(proc, base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")

        # One held-out question per task (never seen in training), chat endpoint,
        # exact mode (nothing reused) and DARE K/V+O reuse at tau 0.05.
        for task, spec in TASKS.items():
            ex = held_out(task)[0]
            for mode in ("off", "kv+o"):
                t = time.time()
                out = client.chat.completions.create(
                    model="dllm", messages=[{"role": "user", "content": ex.question}],
                    max_tokens=spec.gen_length, temperature=0,
                    extra_body={"vllm_xargs": {"dare_mode": mode}},
                )
                answer = out.choices[0].message.content
                ok = is_correct(ex, answer)
                wrong += mode == "off" and not ok
                # This request's own figures (the response's kv_transfer_params).
                figures = (out.model_extra or {}).get("kv_transfer_params") or {}
                dare = figures.get("dare", {})
                print(f"[{task}, dare_mode={mode}] {ex.question!r} -> {answer!r} "
                      f"({'correct' if ok else 'WRONG, expected ' + repr(ex.answer)}; "
                      f"{time.time() - t:.2f}s; {figures.get('dllm', {}).get('forwards')} "
                      f"forwards, K/V reused {dare.get('kv_reuse_fraction', 0):.1%})")

        # Cache policies: the same question with every token fed at every step
        # (none), with Fast-dLLM's DualCache and with dKV-Cache Decode; the
        # response's figures say how many token-layer rows the forwards computed.
        ex = held_out("words")[0]
        for cache in ("none", "dual", "dkv_decode"):
            out = client.chat.completions.create(
                model="dllm", messages=[{"role": "user", "content": ex.question}],
                max_tokens=TASKS["words"].gen_length, temperature=0,
                extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_cache": cache}},
            )
            answer = out.choices[0].message.content
            dllm = ((out.model_extra or {}).get("kv_transfer_params") or {}).get("dllm", {})
            print(f"[dllm_cache={cache}] {ex.question!r} -> {answer!r} "
                  f"({'correct' if is_correct(ex, answer) else 'wrong'}; "
                  f"{dllm.get('computed_rows')} token-layer rows computed)")

        # Parallel decoding: each step commits every position the rule accepts,
        # so the answer takes fewer forwards (NFE, the prompt-only pass included).
        for rule, knobs in (("none", {}), ("threshold", {"dllm_threshold": 0.9}),
                            ("factor", {"dllm_factor": 1.0})):
            out = client.chat.completions.create(
                model="dllm", messages=[{"role": "user", "content": ex.question}],
                max_tokens=TASKS["words"].gen_length, temperature=0,
                extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_parallel": rule,
                                           **knobs}},
            )
            answer = out.choices[0].message.content
            dllm = ((out.model_extra or {}).get("kv_transfer_params") or {}).get("dllm", {})
            print(f"[dllm_parallel={rule}] {ex.question!r} -> {answer!r} "
                  f"({'correct' if is_correct(ex, answer) else 'wrong'}; "
                  f"{dllm.get('forwards')} forwards)")

        stream = client.chat.completions.create(
            model="dllm", messages=[{"role": "user", "content": "words 512"}],
            max_tokens=32, stream=True, temperature=0,
            extra_body={"vllm_xargs": {"dllm_block_length": 8}},
        )
        # Each chunk is the part of the canvas that is final (its committed prefix).
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        pieces = [p for p in pieces if p]
        print(f"[stream] 'words 512' -> {''.join(pieces)!r} in {len(pieces)} chunks: "
              + " | ".join(repr(p) for p in pieces))

        bad = requests.post(
            f"{base}/v1/completions",
            json={"model": "dllm", "prompt": "hi", "max_tokens": 30,
                  "vllm_xargs": {"dllm_block_length": 8}},
            timeout=60,
        )
        print(f"[bad knobs] HTTP {bad.status_code}: {bad.json()['error']['message']}")
        metrics = requests.get(f"{base}/metrics", timeout=30).text

        def total(name: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith(name + "{"))

        rows = total("vllm_dare:attention_rows_total")
        print(f"[/metrics] DARE over all requests: {rows:.0f} token-layer rows, "
              f"K/V reused {total('vllm_dare:kv_rows_reused_total') / rows:.1%}, "
              f"O reused {total('vllm_dare:o_rows_reused_total') / rows:.1%}")
    finally:
        proc.send_signal(signal.SIGINT)  # the server's own graceful shutdown
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if wrong:
        sys.exit(f"{wrong} exact-mode answer(s) wrong")
    print("all exact-mode answers correct")


if __name__ == "__main__":
    main()
