"""Triton kernels of the DARE backend, each with a plain PyTorch twin.

* ``paged_attention_rows`` -- bidirectional attention of *selected* query rows over
  all keys of their request, read from the paged cache; it computes and writes only
  those rows (DARE-O skips the others entirely).
* ``write_rows`` -- scatter the rows of a compact ``[R, C]`` tensor (row i belongs to
  token ``rows[i]``) into a column range of the paged cache at those tokens' slots
  (K, V, O, Q_ref of recomputed tokens only).
* ``query_delta`` -- per token and per head, the relative L2 change of the query
  against its cached Q_ref: ``||q - Q_ref|| / (||Q_ref|| + eps)``.

The twins (``*_reference``) define the semantics and are the kernels' test oracle.
The kernels also run on CPU tensors in Triton's interpreter (the tests do that);
the interpreter needs ``TRITON_INTERPRET=1`` set before Triton is first imported,
because ``tl.sum``/``tl.max``/``tl.zeros`` are themselves jitted helpers. The
engine on CPU runs ``torch_dare_ops`` instead (see ``dare_ops.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout


def _slots_of(block_table: torch.Tensor, req: int, positions: torch.Tensor, block_size: int):
    return block_table[req, positions // block_size].long() * block_size + positions % block_size


# --------------------------------------------------------------------- attention


@triton.jit
def _paged_attention_rows_kernel(
    q_ptr, q_stride_t, q_stride_h,
    cache_ptr, cache_stride_slot,
    block_table_ptr, block_table_stride,
    seq_lens_ptr, row_token_ptr, row_req_ptr,
    out_ptr, out_stride_t, out_stride_h,
    scale,
    K_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // QUERIES_PER_KV
    token = tl.load(row_token_ptr + row).to(tl.int64)
    req = tl.load(row_req_ptr + row).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + token * q_stride_t + head * q_stride_h + d, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale

    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < seq_len
        block = tl.load(
            block_table_ptr + req * block_table_stride + pos // BLOCK_SIZE,
            mask=valid, other=0,
        ).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        base = cache_ptr + slot[:, None] * cache_stride_slot + kv_head * HEAD_DIM + d[None, :]
        mask2 = valid[:, None] & d_mask[None, :]
        k = tl.load(base + K_OFFSET, mask=mask2, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(base + V_OFFSET, mask=mask2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(
        out_ptr + token * out_stride_t + head * out_stride_h + d,
        out.to(out_ptr.dtype.element_ty), mask=d_mask,
    )


def paged_attention_rows(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    cache: torch.Tensor,  # [num_slots, width]
    layout: DareCacheLayout,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    row_token: torch.Tensor,  # [R] token index of each computed row
    row_req: torch.Tensor,  # [R] request of each computed row
    out: torch.Tensor,  # [T, num_heads, head_dim]; only rows row_token are written
    block_size: int,
    scale: float,
) -> None:
    R = row_token.shape[0]
    if R == 0:
        return
    _paged_attention_rows_kernel[(R, layout.num_heads)](
        q, q.stride(0), q.stride(1),
        cache, cache.stride(0),
        block_table, block_table.stride(0),
        seq_lens, row_token, row_req,
        out, out.stride(0), out.stride(1),
        scale,
        K_OFFSET=layout.k_offset, V_OFFSET=layout.v_offset,
        HEAD_DIM=layout.head_dim, BLOCK_D=triton.next_power_of_2(layout.head_dim),
        QUERIES_PER_KV=layout.num_heads // layout.num_kv_heads,
        BLOCK_SIZE=block_size, BLOCK_N=min(64, triton.next_power_of_2(block_size)),
    )


def paged_attention_rows_reference(
    q, cache, layout, block_table, seq_lens, row_token, row_req, out, block_size, scale
) -> None:
    """Twin of ``paged_attention_rows``."""
    D, Hkv = layout.head_dim, layout.num_kv_heads
    group = layout.num_heads // Hkv
    for token, req in zip(row_token.tolist(), row_req.tolist()):
        n = int(seq_lens[req])
        slots = _slots_of(block_table, req, torch.arange(n, device=cache.device), block_size)
        rows = cache[slots].float()
        k = rows[:, layout.k_offset : layout.k_offset + Hkv * D].view(n, Hkv, D)
        v = rows[:, layout.v_offset : layout.v_offset + Hkv * D].view(n, Hkv, D)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qt = q[token].float()  # [H, D]
        scores = torch.einsum("hd,nhd->hn", qt, k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[token] = torch.einsum("hn,nhd->hd", probs, v).to(out.dtype)


# --------------------------------------------------------------------- cache writes


@triton.jit
def _write_rows_kernel(
    src_ptr, src_stride, rows_ptr, slot_mapping_ptr, cache_ptr, cache_stride,
    col_offset, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    token = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    for start in range(0, WIDTH, BLOCK):
        c = start + tl.arange(0, BLOCK)
        m = c < WIDTH
        x = tl.load(src_ptr + i * src_stride + c, mask=m)
        tl.store(cache_ptr + slot * cache_stride + col_offset + c,
                 x.to(cache_ptr.dtype.element_ty), mask=m)


def write_rows(
    src: torch.Tensor,  # [R, C] (row stride arbitrary, columns contiguous)
    rows: torch.Tensor,  # [R] token of each row
    slot_mapping: torch.Tensor,  # [T] slot of each token
    cache: torch.Tensor,  # [num_slots, width]
    col_offset: int,
) -> None:
    R = rows.shape[0]
    if R == 0:
        return
    C = src.shape[1]
    _write_rows_kernel[(R,)](
        src, src.stride(0), rows, slot_mapping, cache, cache.stride(0), col_offset,
        WIDTH=C, BLOCK=min(1024, triton.next_power_of_2(C)),
    )


def write_rows_reference(src, rows, slot_mapping, cache, col_offset) -> None:
    """Twin of ``write_rows``."""
    C = src.shape[1]
    slots = slot_mapping[rows.long()].long()
    cache[slots, col_offset : col_offset + C] = src.to(cache.dtype)


# --------------------------------------------------------------------- predictor


@triton.jit
def _query_delta_kernel(
    q_ptr, q_stride, slot_mapping_ptr, cache_ptr, cache_stride,
    head_delta_ptr, token_delta_ptr, eps,
    QREF_OFFSET: tl.constexpr, NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    diff_total = 0.0
    ref_total = 0.0
    for h in range(NUM_HEADS):
        q = tl.load(q_ptr + token * q_stride + h * HEAD_DIM + d, mask=dm, other=0.0).to(tl.float32)
        r = tl.load(cache_ptr + slot * cache_stride + QREF_OFFSET + h * HEAD_DIM + d,
                    mask=dm, other=0.0).to(tl.float32)
        diff = tl.sum((q - r) * (q - r), axis=0)
        ref = tl.sum(r * r, axis=0)
        tl.store(head_delta_ptr + token * NUM_HEADS + h, tl.sqrt(diff) / (tl.sqrt(ref) + eps))
        diff_total += diff
        ref_total += ref
    tl.store(token_delta_ptr + token, tl.sqrt(diff_total) / (tl.sqrt(ref_total) + eps))


def query_delta(
    q: torch.Tensor,  # [T, num_heads * head_dim]
    slot_mapping: torch.Tensor,  # [T]
    cache: torch.Tensor,  # [num_slots, width]
    layout: DareCacheLayout,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head [T, H], per-token [T]) relative L2 change against Q_ref, fp32."""
    T = q.shape[0]
    head = torch.empty(T, layout.num_heads, dtype=torch.float32, device=q.device)
    tok = torch.empty(T, dtype=torch.float32, device=q.device)
    if T:
        _query_delta_kernel[(T,)](
            q, q.stride(0), slot_mapping, cache, cache.stride(0), head, tok, eps,
            QREF_OFFSET=layout.qref_offset, NUM_HEADS=layout.num_heads,
            HEAD_DIM=layout.head_dim, BLOCK_D=triton.next_power_of_2(layout.head_dim),
        )
    return head, tok


def query_delta_reference(q, slot_mapping, cache, layout, eps: float = 1e-6):
    """Twin of ``query_delta``."""
    T, H, D = q.shape[0], layout.num_heads, layout.head_dim
    ref = cache[slot_mapping.long(), layout.qref_offset : layout.qref_offset + H * D]
    qf, rf = q.float().view(T, H, D), ref.float().view(T, H, D)
    diff = (qf - rf).pow(2).sum(-1)
    norm = rf.pow(2).sum(-1)
    head = diff.sqrt() / (norm.sqrt() + eps)
    tok = diff.sum(-1).sqrt() / (norm.sum(-1).sqrt() + eps)
    return head, tok
