"""Vectorised PyTorch versions of the DARE kernels, for devices without a Triton
backend (vLLM's CPU build: Triton only has an interpreter there, which is a test
tool, not a runtime). Same signatures and semantics as ``triton_dare_kernels``;
the reuse mask is applied the same way: only the selected rows are computed and
written.
"""

from __future__ import annotations

import torch

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout


def paged_attention_rows(
    q, cache, layout: DareCacheLayout, block_table, seq_lens, row_token, row_req, out,
    block_size: int, scale: float,
) -> None:
    if row_token.numel() == 0:
        return
    D, H, Hkv = layout.head_dim, layout.num_heads, layout.num_kv_heads
    group = H // Hkv
    row_token = row_token.long()
    row_req = row_req.long()
    for req in torch.unique(row_req).tolist():
        tokens = row_token[row_req == req]
        n = int(seq_lens[req])
        pos = torch.arange(n, device=cache.device)
        slots = block_table[req, pos // block_size].long() * block_size + pos % block_size
        # Gather the K and V columns only (a slot row also holds O and Q_ref).
        kv = cache[:, layout.k_offset : layout.v_offset + Hkv * D].index_select(0, slots)
        k = kv[:, : Hkv * D].view(n, Hkv, 1, D)
        v = kv[:, Hkv * D :].view(n, Hkv, 1, D)
        qr = q[tokens].view(-1, Hkv, group, D)  # [R, Hkv, G, D]
        scores = torch.einsum("rkgd,nkgd->rkgn", qr.float(), k.float()) * scale
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("rkgn,nkgd->rkgd", probs, v.float())
        out[tokens] = o.reshape(-1, H, D).to(out.dtype)


def write_rows(src, rows, slot_mapping, cache, col_offset: int) -> None:
    if rows.numel() == 0:
        return
    slots = slot_mapping[rows.long()].long()
    cache[slots, col_offset : col_offset + src.shape[1]] = src.to(cache.dtype)


def query_delta(q, slot_mapping, cache, layout: DareCacheLayout, eps: float = 1e-6):
    T, H, D = q.shape[0], layout.num_heads, layout.head_dim
    ref = cache[:, layout.qref_offset : layout.qref_offset + H * D].index_select(
        0, slot_mapping.long()
    )
    qf, rf = q.float().view(T, H, D), ref.float().view(T, H, D)
    diff = (qf - rf).pow(2).sum(-1)
    norm = rf.pow(2).sum(-1)
    return diff.sqrt() / (norm.sqrt() + eps), diff.sum(-1).sqrt() / (norm.sum(-1).sqrt() + eps)
