"""DARE self-attention of one layer inside vLLM: the layer's metadata and paged
cache come from vLLM's forward context, and the work is done by
``dare_layer_step.dare_attention_step`` (which needs no vLLM and is what the layer
benchmark and the GPU runs time)."""

from __future__ import annotations

import torch

from vllm.model_executor.layers.attention.attention import get_attention_context

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_layer_step import (
    DareProjections,
    DareRuntime,
    dare_attention_step,
)
from vllm_dare.attention_backends.dare_metadata import DareMetadata, slot_rows


def dare_self_attention(
    layer_name: str,
    layer_index: int,
    runtime: DareRuntime,
    layout: DareCacheLayout,
    scale: float,
    q: torch.Tensor,  # [T, num_heads * head_dim], RoPE applied
    proj: DareProjections,
) -> torch.Tensor:
    """Projected attention output ``[T, num_heads * head_dim]`` of one layer.

    ``proj`` holds the layer's K/V and output projections: its own layers for
    steps that compute every row, the raw weights (and the keys' rotary
    embedding) for the kernels that project only the recomputed rows.
    """
    meta, _, kv_cache, _ = get_attention_context(layer_name)
    if meta is None:  # profiling / dummy run: shapes only
        T = q.shape[0]
        proj.project_kv(slice(0, T))
        return proj.project_o(torch.zeros_like(q))
    assert isinstance(meta, DareMetadata)
    if meta.causal:
        raise RuntimeError("DARE attention is bidirectional; got a causal batch")
    cache = slot_rows(kv_cache, layout, q.dtype)
    block_size = cache.shape[0] // kv_cache.shape[0]
    return dare_attention_step(meta, cache, block_size, layer_index, runtime, layout, scale,
                               q, proj)
