"""DARE reuse counters (the figures of ``dare_reuse``).

Per layer, in the engine process: tokens processed, K/V rows reused, O rows reused,
summed over all forwards (``layer_totals``). Per request ``dare_reuse.DareRequests``
sums the same counts over layers and steps and reports ``summarize(counts)``
through ``vllm_compat``'s worker-to-scheduler channel (``RequestOutput.kv_transfer_params["dare"]``).

The same per-layer counts are Prometheus counters (``prometheus_client``, created in
the engine process; names below). They appear in ``vllm serve``'s ``/metrics`` when
the engine process and the server share Prometheus' registry: in Prometheus
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the server starts, or
``--api-server-count`` > 1, where vLLM sets it), or with the engine in the same
process (``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). vLLM 0.32/0.33 has no
field in its scheduler-to-frontend stats that a plugin can fill, so with one API
server and no multiprocess directory the counters stay in the engine process
(see docs/dare.md).

* ``vllm_dare:attention_rows_total{model_name,layer}`` -- token rows entering the layer
* ``vllm_dare:kv_rows_reused_total{model_name,layer}`` -- K/V projections skipped
* ``vllm_dare:o_rows_reused_total{model_name,layer}`` -- attention rows skipped

``start_trace()`` / ``stop_trace()`` additionally keep every forward's per-layer
counts, in order, for the reuse heat maps of ``benchmarks/quality_speed.py`` (the
engine must run in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import threading

import numpy as np

from vllm.logger import init_logger

logger = init_logger(__name__)

_lock = threading.Lock()
_layer_totals: np.ndarray | None = None
_trace: list[np.ndarray] | None = None
_prom_metrics: tuple | None = None
_prom_children: dict[tuple[str, int], tuple] = {}

METRIC_NAMES = (
    "vllm_dare:attention_rows",
    "vllm_dare:kv_rows_reused",
    "vllm_dare:o_rows_reused",
)
_DOCS = (
    "Token rows that entered a DARE attention layer (one per token per forward).",
    "Token rows whose K/V projection DARE skipped (K/V reused from the cache).",
    "Token rows whose attention DARE skipped (O reused from the cache).",
)


def _prometheus_children(model_name: str, num_layers: int) -> list[tuple]:
    global _prom_metrics
    if _prom_metrics is None:
        from prometheus_client import Counter

        _prom_metrics = tuple(
            Counter(name, doc, ["model_name", "layer"])
            for name, doc in zip(METRIC_NAMES, _DOCS)
        )
    out = []
    for layer in range(num_layers):
        key = (model_name, layer)
        child = _prom_children.get(key)
        if child is None:
            child = tuple(m.labels(model_name=model_name, layer=str(layer))
                          for m in _prom_metrics)
            _prom_children[key] = child
        out.append(child)
    return out


def record_layers(step_counts: np.ndarray, model_name: str = "") -> None:
    """Add one forward's [num_layers, 3] counts (tokens, K/V reused, O reused)."""
    global _layer_totals
    with _lock:
        for counters, row in zip(_prometheus_children(model_name, step_counts.shape[0]),
                                 step_counts.tolist()):
            for counter, value in zip(counters, row):
                if value:
                    counter.inc(value)
        if _layer_totals is None or _layer_totals.shape != step_counts.shape:
            _layer_totals = np.zeros_like(step_counts)
        _layer_totals += step_counts
        if _trace is not None:
            _trace.append(step_counts.copy())


def start_trace() -> None:
    """Keep each following forward's per-layer counts until ``stop_trace``."""
    global _trace
    with _lock:
        _trace = []


def stop_trace() -> np.ndarray:
    """[num_forwards, num_layers, 3] (tokens, K/V reused, O reused) since
    ``start_trace``; tracing stops."""
    global _trace
    with _lock:
        trace, _trace = _trace, None
    if trace is None:
        raise RuntimeError("stop_trace() without start_trace()")
    if not trace:
        return np.zeros((0, 0, 3), dtype=np.int64)
    return np.stack(trace)


def layer_totals() -> np.ndarray | None:
    """[num_layers, 3]: tokens, K/V reused, O reused, since the engine started."""
    with _lock:
        return None if _layer_totals is None else _layer_totals.copy()


def summarize(counts: np.ndarray) -> dict:
    """A request's figures from its counts (``DareRuntime.request_counts``, summed):
    token-layer rows, K/V and O rows reused, rows forced by rule, rows the K/V and
    the O predictor decided on. What the predictor decided on and did not reuse,
    it refused (its query delta was above the threshold)."""
    tokens, kv, o, forced, kv_decided, o_decided = (int(x) for x in counts)
    return {
        "token_layers": tokens,
        "kv_reused": kv,
        "o_reused": o,
        "kv_reuse_fraction": kv / tokens if tokens else 0.0,
        "o_reuse_fraction": o / tokens if tokens else 0.0,
        "forced_rows": forced,
        "kv_refused": kv_decided - kv,
        "o_refused": o_decided - o,
    }
