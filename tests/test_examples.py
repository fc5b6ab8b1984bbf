"""Each example runs on the packaged default model and shows what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, alarming=("Traceback", "nanobind", "leaked"), timeout: int = 600) -> str:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # as a user runs it
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in alarming:
        assert text not in proc.stdout + proc.stderr, text
    return proc.stdout


def test_batch_generate_answers_every_task(engines):
    engines.close()  # one engine at a time on a 2-core machine
    out = _run("batch_generate.py",
               alarming=("Traceback", "nanobind", "leaked", "force killing", "ERROR"))
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 9 and all(line.endswith("(correct)") for line in lines), out
    for task in ("add", "sort", "words"):
        assert sum(line.startswith(f"[{task}]") for line in lines) == 3
    assert "9 of 9 answers correct" in out


def test_serve_and_query_answers_streams_and_refuses(engines):
    engines.close()
    out = _run("serve_and_query.py",
               alarming=("Traceback", "nanobind", "leaked", "force killing", "ERROR"))
    for task in ("add", "sort", "words"):
        for mode in ("off", "kv+o"):
            line = next(x for x in out.splitlines()
                        if x.startswith(f"[{task}, dare_mode={mode}]"))
            assert "(correct;" in line, line
    rows = {}
    for cache in ("none", "dual", "dkv_decode"):
        line = next(x for x in out.splitlines() if x.startswith(f"[dllm_cache={cache}]"))
        rows[cache] = int(line.rsplit("; ", 1)[1].split()[0])
    # words: gen 32 in blocks of 8; DualCache feeds one block on 7 of a block's 8 steps.
    assert rows["dual"] < rows["dkv_decode"] < rows["none"], rows
    nfe = {}
    for rule in ("none", "threshold", "factor"):
        line = next(x for x in out.splitlines() if x.startswith(f"[dllm_parallel={rule}]"))
        assert "(correct;" in line, line
        nfe[rule] = int(line.rsplit("; ", 1)[1].split()[0])
    # 32 tokens in blocks of 8: one token per step is 32 forwards + the prompt pass;
    # a rule commits at least one per step, more where the model is confident.
    assert nfe["none"] == 33 and nfe["threshold"] < 33 and nfe["factor"] < 33, nfe
    stream = next(x for x in out.splitlines() if x.startswith("[stream]"))
    assert stream.startswith("[stream] 'words 512' -> 'five hundred twelve' in "), stream
    # The answer arrives in pieces while the canvas is still being denoised.
    assert int(stream.split(" in ")[1].split()[0]) >= 2, stream
    assert "[bad knobs] HTTP 400: max_tokens=30 must be a multiple of the block length 8" in out
    assert "[/metrics] DARE over all requests:" in out
    assert "all exact-mode answers correct" in out
