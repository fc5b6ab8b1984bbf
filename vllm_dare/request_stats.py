"""Per-request figures handed from the worker to the request's output.

The sampler records them when a request emits its canvas; the scheduler attaches
them to the finished request's output as ``RequestOutput.kv_transfer_params`` --
the one free-form per-request field vLLM carries from the engine to the client:

* ``"dllm"``: ``forwards`` (model forwards that processed the request, the prompt
  pass included: the NFE), ``denoising_steps`` (steps run), ``gen_length``;
* ``"dare"`` (DARE backend only): reuse counts, see ``dare_stats.summarize``.

Worker and scheduler share this module when they share a process (vLLM's
single-process executor: one GPU, or the CPU build); with tensor parallelism the
workers run apart and the figures are not attached.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_pending: dict[str, dict] = {}
_MAX_PENDING = 100_000  # bound for figures nobody collects


def put(req_id: str, section: str, stats: dict) -> None:
    with _lock:
        _pending.setdefault(req_id, {})[section] = stats
        if len(_pending) > _MAX_PENDING:
            _pending.pop(next(iter(_pending)))


def take(req_id: str) -> dict | None:
    with _lock:
        return _pending.pop(req_id, None)
