"""Vectorised PyTorch versions of the DARE kernels, for devices without a Triton
backend (vLLM's CPU build: Triton only has an interpreter there, which is a test
tool, not a runtime). Same signatures and semantics as ``triton_dare_kernels``;
the reuse mask is applied the same way: only the selected rows are computed and
written. The ``scratch`` storage ``decide_reuse`` and ``select_rows`` take (to spare
a GPU layer step its allocations) goes unused: they return new tensors.
"""

from __future__ import annotations

import torch

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout


def paged_attention_rows(
    q, cache, layout: DareCacheLayout, block_table, seq_lens, row_token, row_req, out,
    block_size: int, scale: float, max_rows_per_req: int | None = None,
    req_row_start: torch.Tensor | None = None,
) -> None:
    if req_row_start is not None:  # the rows it covers (a select_rows list is padded)
        per_req = req_row_start.long().diff()
        row_req = torch.repeat_interleave(
            torch.arange(per_req.numel(), device=per_req.device), per_req)
        row_token = row_token[: row_req.numel()]
    if row_token.numel() == 0:
        return
    D, H, Hkv = layout.head_dim, layout.num_heads, layout.num_kv_heads
    group = H // Hkv
    row_token = row_token.long()
    row_req = row_req.long()
    # One padded batch over requests (no Python loop per request): request b's
    # rows are queries [b, :R_b], its keys/values the first seq_lens[b] slots.
    B = seq_lens.shape[0]
    counts = torch.bincount(row_req, minlength=B)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(row_req.numel(), device=q.device) - first[row_req]
    r_max = int(counts.max())
    seq_lens = seq_lens.long()
    n_max = int(seq_lens.max())
    pos = torch.arange(n_max, device=cache.device)
    block_col = (pos // block_size).clamp(max=block_table.shape[1] - 1)
    slots = block_table[:, block_col].long() * block_size + pos % block_size  # [B, N]
    valid = pos[None, :] < seq_lens[:, None]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    # Gather the K and V columns only (a slot row also holds O and Q_ref).
    kv = cache[:, layout.k_offset : layout.v_offset + Hkv * D].index_select(0, slots.view(-1))
    kv = kv.view(B, n_max, 2, Hkv, D).float()
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, Hkv, N, D]
    qp = q.new_zeros((B, r_max, H, D), dtype=torch.float32)
    qp[row_req, rank] = q[row_token].float()
    # Padded key slots are masked out; with equal lengths there is nothing to mask
    # and SDPA takes its fused path.
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    o = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1
    )  # [B, H, R, D]
    out[row_token] = o.transpose(1, 2)[row_req, rank].to(out.dtype)


def dense_attention(q, k, v, layout: DareCacheLayout, seq_len: int, scale: float,
                    in_fp32: bool = True):
    """Bidirectional attention of requests of ``seq_len`` tokens each, laid end to
    end, on their own keys and values (no cache): q ``[T, H, D]``, k and v
    ``[T, Hkv * D]`` (any row stride); returns ``[T, H, D]``. PyTorch's SDPA, in
    fp32 as ``paged_attention_rows`` computes it here (``in_fp32``), else in the
    tensors' dtype (the Triton kernel set's version, on a GPU)."""
    T, H, D = q.shape
    R = T // seq_len
    qd, kd, vd = (t.reshape(R, seq_len, -1, D).transpose(1, 2) for t in (q, k, v))
    if in_fp32:
        qd, kd, vd = qd.float(), kd.float(), vd.float()
    o = torch.nn.functional.scaled_dot_product_attention(
        qd, kd, vd, scale=scale, enable_gqa=H != layout.num_kv_heads)
    return o.transpose(1, 2).reshape(T, H, D).to(q.dtype)


def write_rows(src, rows, slot_mapping, cache, col_offset: int,
               src_by_token: bool = False, count: torch.Tensor | None = None) -> None:
    if count is not None:
        rows = rows[: int(count)]
        src = src if src_by_token else src[: rows.numel()]
    if rows.numel() == 0:
        return
    rows = rows.long()
    slots = slot_mapping[rows].long()
    if src_by_token:
        src = src.index_select(0, rows)
    cache[slots, col_offset : col_offset + src.shape[1]] = src.to(cache.dtype)


def write_kv_rows(k, v, rows, slot_mapping, cache, layout: DareCacheLayout) -> None:
    if rows.numel() == 0:
        return
    slots = slot_mapping[rows.long()].long()
    cache[slots, layout.k_offset : layout.k_offset + layout.kv_width] = k.to(cache.dtype)
    cache[slots, layout.v_offset : layout.v_offset + layout.kv_width] = v.to(cache.dtype)


def decide_reuse(q, slot_mapping, cache, layout: DareCacheLayout, tau_kv, tau_o,
                 per_head: bool, qref_follows_kv=None, reuse_counts=None, o_out=None,
                 eps: float = 1e-6, scratch=None) -> torch.Tensor:
    T, H, D = q.shape[0], layout.num_heads, layout.head_dim
    ref = cache[:, layout.qref_offset : layout.qref_offset + H * D].index_select(
        0, slot_mapping.long()
    )
    qf, rf = q.float().view(T, H, D), ref.float().view(T, H, D)
    diff = (qf - rf).pow(2).sum(-1)
    norm = rf.pow(2).sum(-1)
    if per_head:
        delta = (diff.sqrt() / (norm.sqrt() + eps)).amax(dim=-1)
    else:
        delta = diff.sum(-1).sqrt() / (norm.sum(-1).sqrt() + eps)
    reuse = torch.stack((delta <= tau_kv, delta <= tau_o), dim=1)
    if reuse_counts is not None:
        reuse_counts += reuse
    if o_out is not None:
        # The cached O of the rows that reuse it (their count is read on the host,
        # which costs nothing on the CPU these ops run on).
        o_rows = reuse[:, 1].nonzero().squeeze(1)
        o_out[o_rows] = cache[slot_mapping[o_rows].long(),
                              layout.o_offset : layout.o_offset + layout.q_width].to(o_out.dtype)
    if qref_follows_kv is not None:
        # Q_ref := q where what it follows is recomputed (the deltas above read a
        # copy of Q_ref). Only those rows are written; the row list is read on the
        # host, which costs nothing on the CPU these ops run on.
        recomputed = ~torch.where(qref_follows_kv, reuse[:, 0], reuse[:, 1])
        write_rows(q, recomputed.nonzero().squeeze(1), slot_mapping, cache,
                   layout.qref_offset, src_by_token=True)
    return torch.cat((reuse, ~reuse), dim=1)


def select_rows(flags, query_start_loc, totals, scratch=None):
    T = flags.shape[0]
    picks = torch.stack((flags[:, 2], flags[:, 3]))
    prefix = torch.nn.functional.pad(torch.cumsum(picks, dim=1, dtype=torch.int32), (1, 0))
    req_row_start = prefix[:, query_start_loc.long()]
    counts = prefix[:, -1].contiguous()
    totals += counts
    # The selected tokens first, in token order (a stable sort on "not selected").
    rows = torch.sort((~picks).to(torch.uint8), dim=1, stable=True).indices
    rows.masked_fill_(torch.arange(T, device=flags.device) >= prefix[:, -1:], 0)
    return rows, req_row_start, counts


def project_rows(x, weight, bias, rows, count, head_dim: int, out, out_col: int = 0,
                 slot_mapping=None, out_at_slot: bool = False, out2=None, out2_col: int = 0,
                 positions=None, cos_sin_cache=None, rope_heads: int = 0) -> None:
    if slot_mapping is None and (out_at_slot or out2 is not None):
        raise ValueError("project_rows: a cache output is addressed through slot_mapping")
    rows = rows[: int(count)]
    if rows.numel() == 0:
        return
    y = torch.nn.functional.linear(x.index_select(0, rows), weight, bias)
    if rope_heads:
        n, half, width = rows.numel(), head_dim // 2, rope_heads * head_dim
        cos, sin = cos_sin_cache.index_select(0, positions[rows]).float().view(
            n, 1, 2, half).unbind(2)
        lo, hi = y[:, :width].float().view(n, rope_heads, 2, half).unbind(2)
        rotated = torch.stack((lo * cos - hi * sin, hi * cos + lo * sin), dim=2)
        y[:, :width] = rotated.view(n, width).to(y.dtype)
    n_out = y.shape[1]
    slots = slot_mapping.index_select(0, rows) if slot_mapping is not None else None
    out[slots if out_at_slot else rows, out_col : out_col + n_out] = y.to(out.dtype)
    if out2 is not None:
        out2[slots, out2_col : out2_col + n_out] = y.to(out2.dtype)
