"""DARE reuse counters.

Per layer, in the engine process: tokens processed, K/V rows reused, O rows reused,
summed over all forwards (``layer_totals``). Per request the sampler sums the same
counts over layers and steps and reports ``summarize(counts)`` through
``vllm_dare.request_stats`` (``RequestOutput.kv_transfer_params["dare"]``).
"""

from __future__ import annotations

import threading

import numpy as np

from vllm.logger import init_logger

logger = init_logger(__name__)

_lock = threading.Lock()
_layer_totals: np.ndarray | None = None


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
