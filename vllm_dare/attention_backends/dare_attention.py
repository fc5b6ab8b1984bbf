"""DARE self-attention of one layer: decide, per token, what to reuse, and compute
only the rest.

For every token processed in a step the layer computes its query (the layer input
is needed for it anyway), then the relative L2 change against the token's cached
reference query (``query_delta`` kernel). With ``delta <= tau`` (and the token not
forced to recompute):

* DARE-KV reuses the token's cached K/V: its key/value projection is not computed
  and its cache slots are not rewritten;
* DARE-O reuses the token's cached attention output: its attention row is not
  computed (``paged_attention_rows`` only runs the recomputed rows) and O is read
  from the cache.

Q_ref is rewritten only for tokens whose cached activations were recomputed: those
whose K/V were recomputed when the request reuses K/V, else those whose O was.
``tau = 0`` disables a reuse, so with both at 0 every row is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm.model_executor.layers.attention.attention import get_attention_context

from vllm_dare.attention_backends.dare_backend import DareMetadata, slot_rows
from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_ops import dare_ops


@dataclass
class DareStepInputs:
    """Per-token inputs of one forward, built by the ModelState."""

    force: torch.Tensor  # bool [T]: recompute everything for this token
    tau_kv: torch.Tensor  # float32 [T]; 0 = never reuse K/V
    tau_o: torch.Tensor  # float32 [T]; 0 = never reuse O
    kv_is_reference: torch.Tensor  # bool [T]: Q_ref follows K/V recomputes (else O's)
    any_reuse: bool  # False: every row is recomputed, skip the predictor


class DareRuntime:
    """Shared by the attention layers of one model: the step's inputs and the
    reuse counters of the step (per layer and per request)."""

    def __init__(self, num_layers: int, per_head: bool, device: torch.device):
        self.num_layers = num_layers
        self.per_head = per_head
        self.device = device
        self.step: DareStepInputs | None = None
        self.ops = dare_ops(device)
        self.num_reqs = 0
        # [layers, 3]: tokens, K/V rows reused, O rows reused (this step)
        self.layer_counts = torch.zeros(num_layers, 3, dtype=torch.int64, device=device)
        # [max_reqs, 3] per request of the batch (this step, summed over layers)
        self.request_counts = torch.zeros(0, 3, dtype=torch.int64, device=device)

    def begin_step(self, step: DareStepInputs | None, num_reqs: int) -> None:
        self.step = step
        self.num_reqs = num_reqs
        self.layer_counts.zero_()
        self.request_counts = torch.zeros(num_reqs, 3, dtype=torch.int64, device=self.device)


def attend_all_rows(query, key, value, kv_cache, meta: DareMetadata, layout, scale):
    """Every row recomputed: write K, V, Q_ref and O of all tokens."""
    ops = dare_ops(query.device)
    write_rows, paged_attention_rows = ops.write_rows, ops.paged_attention_rows
    T = meta.num_actual_tokens
    cache = slot_rows(kv_cache, layout, query.dtype)
    rows = torch.arange(T, device=query.device, dtype=torch.int32)
    q = query[:T].reshape(T, layout.q_width)
    write_rows(key[:T].reshape(T, layout.kv_width), rows, meta.slot_mapping, cache, layout.k_offset)
    write_rows(value[:T].reshape(T, layout.kv_width), rows, meta.slot_mapping, cache, layout.v_offset)
    write_rows(q, rows, meta.slot_mapping, cache, layout.qref_offset)
    out = torch.empty(T, layout.num_heads, layout.head_dim, dtype=query.dtype, device=query.device)
    block_size = cache.shape[0] // kv_cache.shape[0]
    paged_attention_rows(q.view(T, layout.num_heads, layout.head_dim), cache, layout,
                         meta.block_table, meta.seq_lens, rows, meta.token_req, out,
                         block_size, scale)
    write_rows(out.view(T, layout.q_width), rows, meta.slot_mapping, cache, layout.o_offset)
    return out


def dare_self_attention(
    layer_name: str,
    layer_index: int,
    runtime: DareRuntime,
    layout: DareCacheLayout,
    scale: float,
    q: torch.Tensor,  # [T, num_heads * head_dim], RoPE applied
    project_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Attention output ``[T, num_heads * head_dim]`` of one layer.

    ``project_kv(rows)`` returns the keys (RoPE applied) and values of the given
    token rows, ``[R, kv_width]`` each; it is called for the recomputed rows only.
    """
    meta, _, kv_cache, _ = get_attention_context(layer_name)
    ops = runtime.ops
    write_rows, paged_attention_rows = ops.write_rows, ops.paged_attention_rows
    T = q.shape[0]
    if meta is None:  # profiling / dummy run: shapes only
        k, v = project_kv(torch.arange(T, device=q.device))
        return torch.zeros_like(q)
    assert isinstance(meta, DareMetadata)
    if meta.causal:
        raise RuntimeError("DARE attention is bidirectional; got a causal batch")
    T = meta.num_actual_tokens
    q = q[:T]
    cache = slot_rows(kv_cache, layout, q.dtype)
    block_size = cache.shape[0] // kv_cache.shape[0]
    step = runtime.step
    if step is not None and step.force.shape[0] != T:
        step = None  # not this batch's inputs (dummy run)

    all_rows = torch.arange(T, device=q.device)
    if step is None or not step.any_reuse:
        recompute_kv = recompute_o = torch.ones(T, dtype=torch.bool, device=q.device)
    else:
        head_delta, token_delta = ops.query_delta(q, meta.slot_mapping, cache, layout)
        delta = head_delta.amax(dim=-1) if runtime.per_head else token_delta
        recompute_kv = step.force | ~(delta <= step.tau_kv) | (step.tau_kv <= 0)
        recompute_o = step.force | ~(delta <= step.tau_o) | (step.tau_o <= 0)
    kv_rows = all_rows[recompute_kv]
    o_rows = all_rows[recompute_o]

    # K/V projection of the recomputed rows only.
    if kv_rows.numel():
        k, v = project_kv(kv_rows)
        kv_rows32 = kv_rows.to(torch.int32)
        write_rows(k, kv_rows32, meta.slot_mapping, cache, layout.k_offset)
        write_rows(v, kv_rows32, meta.slot_mapping, cache, layout.v_offset)
    if step is None:
        ref_rows = all_rows
    else:
        ref_mask = torch.where(step.kv_is_reference, recompute_kv, recompute_o)
        ref_rows = all_rows[ref_mask]
    if ref_rows.numel():
        write_rows(q[ref_rows], ref_rows.to(torch.int32), meta.slot_mapping, cache,
                   layout.qref_offset)

    out = torch.empty(T, layout.num_heads, layout.head_dim, dtype=q.dtype, device=q.device)
    o_rows32 = o_rows.to(torch.int32)
    paged_attention_rows(q.view(T, layout.num_heads, layout.head_dim), cache, layout,
                         meta.block_table, meta.seq_lens, o_rows32, meta.token_req[o_rows],
                         out, block_size, scale)
    reused_o = all_rows[~recompute_o]
    if reused_o.numel():
        o_cols = cache[:, layout.o_offset : layout.o_offset + layout.q_width]
        cached = o_cols.index_select(0, meta.slot_mapping[reused_o])
        out[reused_o] = cached.view(-1, layout.num_heads, layout.head_dim)
    if o_rows.numel():
        write_rows(out.view(T, layout.q_width)[o_rows], o_rows32, meta.slot_mapping, cache,
                   layout.o_offset)

    # Counters: tokens, K/V reused, O reused (per layer and per request).
    reused = torch.stack([torch.ones_like(recompute_kv), ~recompute_kv, ~recompute_o], dim=1)
    reused = reused.to(torch.int64)
    runtime.layer_counts[layer_index] += reused.sum(dim=0)
    if runtime.request_counts.shape[0]:
        runtime.request_counts.index_add_(0, meta.token_req.long(), reused)
    return out.view(T, layout.q_width)
