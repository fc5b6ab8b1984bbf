"""Serve a diffusion model with vLLM's OpenAI server and query it.

Starts ``python -m vllm.entrypoints.openai.api_server`` on the packaged default
model (or --model PATH), sends a completion, a chat completion and a streamed
completion with per-request denoising knobs, prints them, and stops the server.

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
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", args.model, "--served-model-name", "dllm",
        "--max-model-len", "512", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    print("$", " ".join(cmd), flush=True)
    # Own session: the shutdown signal reaches the API server only, which then stops
    # its engine process itself.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        knobs = {"vllm_xargs": {"dllm_steps": 32, "dllm_block_length": 32}}

        t = time.time()
        out = client.completions.create(
            model="dllm", prompt="12+34=", max_tokens=32, extra_body=knobs
        )
        print(f"\n[completion] {out.choices[0].text!r} "
              f"({out.usage.completion_tokens} tokens, {time.time() - t:.2f}s)")

        out = client.chat.completions.create(
            model="dllm",
            messages=[{"role": "user", "content": "Sort: 9 3 7 1"}],
            max_tokens=32,
            extra_body=knobs,
        )
        print(f"[chat] {out.choices[0].message.content!r}")

        stream = client.completions.create(
            model="dllm", prompt="hello", max_tokens=32, stream=True, extra_body=knobs
        )
        print("[stream]", "".join(c.choices[0].text for c in stream if c.choices))

        bad = requests.post(
            f"{base}/v1/completions",
            json={"model": "dllm", "prompt": "hi", "max_tokens": 30,
                  "vllm_xargs": {"dllm_block_length": 8}},
            timeout=60,
        )
        print(f"[bad knobs] HTTP {bad.status_code}: {bad.json()['error']['message']}")
    finally:
        proc.send_signal(signal.SIGINT)  # the server's own graceful shutdown
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
