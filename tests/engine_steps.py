"""Driving an in-process engine step by step (shared by the scheduling tests)."""

from __future__ import annotations

import time

import pytest

# Prompts of mixed lengths shared by the engine tests that compare batched
# outputs with the reference.
PROMPTS = [
    "hello world",
    "12+34=",
    "a much longer prompt that spans several dozen tokens of text",
    "x",
    "Sort: 9 3 7 1",
]


def run_engine(llm, requests, max_steps: int, abort_after=None, tag: str = "req"):
    """Add ``(prompt_ids, params)`` requests and step the engine until they finish,
    at most ``max_steps`` steps (so that a livelock fails instead of hanging).
    ``abort_after=(k, n)`` aborts request k after n steps. Returns the final
    outputs by request index (None for the aborted one)."""
    engine = llm.llm_engine
    ids = [f"{tag}-{k}-{time.monotonic_ns()}" for k in range(len(requests))]
    for rid, (prompt, params) in zip(ids, requests):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    index = {rid: k for k, rid in enumerate(ids)}
    done = {}
    for step in range(max_steps):
        if abort_after is not None and step == abort_after[1]:
            engine.abort_request([ids[abort_after[0]]])
            done[abort_after[0]] = None
        for out in engine.step():
            if out.finished:
                done[index[out.request_id]] = out
        if len(done) == len(requests):
            return done
    pytest.fail(f"requests still unfinished after {max_steps} engine steps: "
                f"{sorted(set(range(len(requests))) - set(done))}")
