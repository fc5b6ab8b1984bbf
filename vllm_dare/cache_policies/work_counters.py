"""Prometheus counters of the token-layer rows the forwards computed.

Per forward and layer, a scheduled token is either fed (its row is computed:
embedding, projections, attention, MLP) or left to the KV cache by its request's
cache policy. Two counters, created in the engine process like DARE's (see
``dare_counters.py`` for when they reach ``/metrics``):

* ``vllm_dare:scheduled_rows_total{model_name}`` -- token-layer rows an exact
  forward over the scheduled tokens would compute;
* ``vllm_dare:computed_rows_total{model_name}`` -- token-layer rows computed.

Per request the same count is ``kv_transfer_params["dllm"]["computed_rows"]``.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_metrics: tuple | None = None
_children: dict[str, tuple] = {}
_totals = [0, 0]


def record_forward(scheduled_rows: int, computed_rows: int, model_name: str = "") -> None:
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter

            _metrics = (
                Counter("vllm_dare:scheduled_rows", "Token-layer rows an exact forward "
                        "over the scheduled tokens computes.", ["model_name"]),
                Counter("vllm_dare:computed_rows", "Token-layer rows the forwards "
                        "computed (tokens a cache policy left to the KV cache excluded).",
                        ["model_name"]),
            )
        children = _children.get(model_name)
        if children is None:
            children = tuple(m.labels(model_name=model_name) for m in _metrics)
            _children[model_name] = children
        children[0].inc(scheduled_rows)
        children[1].inc(computed_rows)
        _totals[0] += scheduled_rows
        _totals[1] += computed_rows


def totals() -> tuple[int, int]:
    """(scheduled, computed) token-layer rows since the engine started, in this
    process."""
    with _lock:
        return _totals[0], _totals[1]
