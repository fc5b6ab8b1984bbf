"""DARE reuse counters of the engine process.

Per layer: tokens processed, K/V rows reused, O rows reused, summed over all
forwards. Per request (kept until the scheduler hands it to the request's output as
``RequestOutput.kv_transfer_params["dare"]``): the same three counts summed over
layers and steps, and the derived reuse fractions.

The worker and the scheduler share this module when they share a process (vLLM's
single-process executor: one GPU, or the CPU build); with tensor parallelism the
workers run in their own processes and per-request figures are not attached.
"""

from __future__ import annotations

import threading

import numpy as np

from vllm.logger import init_logger

logger = init_logger(__name__)

_lock = threading.Lock()
_layer_totals: np.ndarray | None = None
_finished: dict[str, dict] = {}


def record_layers(step_counts: np.ndarray) -> None:
    global _layer_totals
    with _lock:
        if _layer_totals is None or _layer_totals.shape != step_counts.shape:
            _layer_totals = np.zeros_like(step_counts)
        _layer_totals += step_counts


def layer_totals() -> np.ndarray | None:
    """[num_layers, 3]: tokens, K/V reused, O reused, since the engine started."""
    with _lock:
        return None if _layer_totals is None else _layer_totals.copy()


def summarize(counts: np.ndarray) -> dict:
    tokens, kv, o = (int(x) for x in counts)
    return {
        "token_layers": tokens,
        "kv_reused": kv,
        "o_reused": o,
        "kv_reuse_fraction": kv / tokens if tokens else 0.0,
        "o_reuse_fraction": o / tokens if tokens else 0.0,
    }


def finish_request(req_id: str, counts: np.ndarray, num_layers: int) -> None:
    stats = summarize(counts)
    stats["num_layers"] = num_layers
    logger.debug("DARE request %s: %s", req_id, stats)
    with _lock:
        _finished[req_id] = stats
        if len(_finished) > 100_000:  # results nobody collected
            _finished.pop(next(iter(_finished)))


def take_request(req_id: str) -> dict | None:
    with _lock:
        return _finished.pop(req_id, None)
