"""Triton kernels of the DARE backend, each with a plain PyTorch twin.

* ``paged_attention_rows`` -- bidirectional attention of *selected* query rows over
  all keys of their request, read from the paged cache; it computes and writes only
  those rows (DARE-O skips the others entirely). Flash-style tiles of selected rows.
* ``write_rows`` -- scatter rows of a tensor into a column range of the paged cache
  at the slots of the tokens ``rows`` lists (O and Q_ref of recomputed tokens
  only); ``write_kv_rows`` does K and V in one launch.
* ``decide_reuse`` -- the predictor: per token the relative L2 change of its query
  against its cached Q_ref, ``||q - Q_ref|| / (||Q_ref|| + eps)`` (over the whole
  row, or the largest over heads), compared with the token's thresholds; it emits
  the reuse and recompute flags the layer step selects its rows from, and in the
  same launch rewrites the Q_ref of recomputed tokens, counts the reuse per token
  and copies the cached O rows of the tokens that reuse them into the output.
* ``select_rows`` -- the row lists of a step (K/V recomputed, O recomputed) and
  their lengths, compacted on the device: the host never learns how many rows
  there are.
* ``project_rows`` -- a linear projection of the listed rows only, with bias and
  rotary embedding of the keys in its epilogue, stored straight into the cache
  slots (K/V) or the layer output and its O slots: tiles past the list's length
  return at once.

* ``dense_attention`` (no kernel of ours: PyTorch's SDPA) -- a step that recomputes
  every row of whole, equally long sequences attends on its own keys and values.

``write_rows``, ``paged_attention_rows`` and ``project_rows`` take lists padded to
every token with their length on the device, so a layer step that reuses rows
launches all its work without waiting for the GPU.

The twins (``*_reference``) define the semantics and are the kernels' test oracle.
The kernels also run on CPU tensors in Triton's interpreter (the tests do that);
the interpreter needs ``TRITON_INTERPRET=1`` set before Triton is first imported,
because ``tl.sum``/``tl.max``/``tl.zeros`` are themselves jitted helpers. The
engine on CPU runs ``torch_dare_ops`` instead (see ``dare_ops.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vllm_dare.attention_backends import torch_dare_ops
from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.row_selection_scratch import RowSelectionScratch


def _slots_of(block_table: torch.Tensor, req: int, positions: torch.Tensor, block_size: int):
    return block_table[req, positions // block_size].long() * block_size + positions % block_size


# --------------------------------------------------------------------- attention


@triton.jit
def _paged_attention_rows_kernel(
    q_ptr, q_stride_t, q_stride_h,
    cache_ptr, cache_stride_slot,
    block_table_ptr, block_table_stride,
    seq_lens_ptr, row_token_ptr, req_row_start_ptr,
    out_ptr, out_stride_t, out_stride_h,
    scale,
    K_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.program_id(1)
    req = tl.program_id(2)
    first = tl.load(req_row_start_ptr + req) + tile * BLOCK_M
    end = tl.load(req_row_start_ptr + req + 1)
    if first >= end:  # this request has fewer selected rows
        return
    m = first + tl.arange(0, BLOCK_M)
    m_valid = m < end
    token = tl.load(row_token_ptr + m, mask=m_valid, other=0).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + req)
    kv_head = head // QUERIES_PER_KV
    req64 = req.to(tl.int64)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_mask = m_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + token[:, None] * q_stride_t + head * q_stride_h + d[None, :],
                mask=q_mask, other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < seq_len
        block = tl.load(block_table_ptr + req64 * block_table_stride + pos // BLOCK_SIZE,
                        mask=valid, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        base = cache_ptr + slot[:, None] * cache_stride_slot + kv_head * HEAD_DIM + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(base + K_OFFSET, mask=kv_mask, other=0.0)
        v = tl.load(base + V_OFFSET, mask=kv_mask, other=0.0)
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # Scores in log2 units (scale * log2(e) folded in), for exp2.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                            input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + token[:, None] * out_stride_t + head * out_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _override(meta: dict, tiles: dict | None, kernel: str, names: set[str]) -> None:
    """Replace a launch's default tile sizes (``names``) and launch parameters with
    ``tiles`` (for ``benchmarks/kernel_tiles.py``, which sweeps them)."""
    if tiles:
        unknown = set(tiles) - names - {"num_warps", "num_stages"}
        if unknown:
            raise ValueError(f"{kernel}: unknown tile parameters {sorted(unknown)}")
        meta.update(tiles)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def paged_attention_rows(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    cache: torch.Tensor,  # [num_slots, width]
    layout: DareCacheLayout,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    row_token: torch.Tensor,  # [R] token index of each computed row
    row_req: torch.Tensor | None,  # [R] request of each row, non-decreasing (or None
    # with req_row_start)
    out: torch.Tensor,  # [T, num_heads, head_dim]; only rows row_token are written
    block_size: int,
    scale: float,
    max_rows_per_req: int | None = None,
    req_row_start: torch.Tensor | None = None,
    tiles: dict | None = None,  # overrides of BLOCK_M, BLOCK_N, num_warps, num_stages
) -> None:
    """Flash-style: one program per (query head, tile of up to BLOCK_M selected rows,
    request), keys and values streamed from the paged cache in BLOCK_N chunks
    through ``tl.dot``. The selected rows must be grouped by request in request
    order (``row_req`` non-decreasing), as the DARE layer step hands them.
    ``req_row_start`` ([num_reqs + 1], optional) is where each request's rows
    start in the selection; the caller that has it (every row selected: the batch's
    ``query_start_loc``; a ``select_rows`` list) saves its computation from
    ``row_req``, and only the first ``req_row_start[num_reqs]`` rows are computed
    (a ``select_rows`` list is padded to every token).

    ``max_rows_per_req`` bounds the rows of one request (e.g. the batch's longest
    query; default R) and sizes the grid without a host sync: programs past their
    request's rows return at once. Products are bf16/fp16 on the tensor cores with
    fp32 accumulation, or IEEE fp32 for fp32 tensors. (Triton's interpreter gets
    ``tl.dot`` of bf16 wrong, so under it the operands are widened to fp32.)"""
    R = row_token.shape[0]
    if R == 0:
        return
    num_reqs = block_table.shape[0]
    bound = R if max_rows_per_req is None else min(R, max_rows_per_req)
    if req_row_start is None:
        boundaries = torch.arange(num_reqs + 1, dtype=row_req.dtype, device=q.device)
        req_row_start = torch.searchsorted(row_req, boundaries, out_int32=True)
    meta = paged_attention_constexprs(layout, block_size, R, q.dtype)
    _override(meta, tiles, "paged_attention_rows", {"BLOCK_M", "BLOCK_N"})
    grid = (layout.num_heads, triton.cdiv(bound, meta["BLOCK_M"]), num_reqs)
    _paged_attention_rows_kernel[grid](
        q, q.stride(0), q.stride(1),
        cache, cache.stride(0),
        block_table, block_table.stride(0),
        seq_lens, row_token, req_row_start,
        out, out.stride(0), out.stride(1),
        scale,
        **meta,
    )


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DareCacheLayout,
                    seq_len: int, scale: float) -> torch.Tensor:
    """Bidirectional attention of requests of ``seq_len`` tokens each, laid end to
    end, on their own keys and values (no cache): q ``[T, H, D]``, k and v
    ``[T, Hkv * D]`` (any row stride); returns ``[T, H, D]``. For a step that
    recomputes every row of whole sequences, where the paged cache holds nothing
    else: PyTorch's SDPA (a flash kernel on a GPU) in the tensors' dtype, about
    twice as fast as ``paged_attention_rows`` over every row of 4 x 2048 tokens
    (``benchmarks/kernel_tiles.py --kernel attention``, H100). Under Triton's
    interpreter (CPU tests) in fp32, like the twins."""
    return torch_dare_ops.dense_attention(q, k, v, layout, seq_len, scale,
                                          in_fp32=_interpreted())


def paged_attention_constexprs(layout: DareCacheLayout, block_size: int, rows: int,
                               dtype: torch.dtype) -> dict:
    """The compile-time and launch parameters ``paged_attention_rows`` runs its kernel
    with (``rows``: the length of the row list). The 16-bit tiles are the fastest of
    ``benchmarks/kernel_tiles.py --kernel attention`` on an H100 (geometric mean over
    LLaDA-8B and Dream-7B layouts, under and over 1024 rows)."""
    fp32 = dtype == torch.float32
    if rows < 64:
        tiles = dict(BLOCK_M=16, BLOCK_N=64)
    elif fp32:
        tiles = dict(BLOCK_M=64, BLOCK_N=64)
    elif rows < 1024:
        tiles = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)
    else:
        tiles = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(
        K_OFFSET=layout.k_offset, V_OFFSET=layout.v_offset,
        HEAD_DIM=layout.head_dim, BLOCK_D=max(16, triton.next_power_of_2(layout.head_dim)),
        QUERIES_PER_KV=layout.num_heads // layout.num_kv_heads,
        BLOCK_SIZE=block_size, **tiles,
        FP32_DOT=fp32 or _interpreted(),
        DOT_PRECISION="ieee" if fp32 else "tf32",
    )


def _listed_rows(row_token, req_row_start):
    """The rows ``req_row_start`` covers, and the request of each."""
    per_req = req_row_start.long().diff()
    row_req = torch.repeat_interleave(torch.arange(per_req.numel(), device=per_req.device),
                                      per_req)
    return row_token[: row_req.numel()], row_req


def paged_attention_rows_reference(
    q, cache, layout, block_table, seq_lens, row_token, row_req, out, block_size, scale,
    max_rows_per_req: int | None = None, req_row_start: torch.Tensor | None = None,
) -> None:
    """Twin of ``paged_attention_rows`` (``max_rows_per_req`` is only a grid bound
    there, ``req_row_start`` a precomputed function of ``row_req``)."""
    if req_row_start is not None:
        row_token, row_req = _listed_rows(row_token, req_row_start)
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
def _copy_row(src_ptr, dst_ptr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Copy WIDTH contiguous elements, converted to the destination's dtype."""
    for start in range(0, WIDTH, BLOCK):
        c = start + tl.arange(0, BLOCK)
        m = c < WIDTH
        x = tl.load(src_ptr + c, mask=m)
        tl.store(dst_ptr + c, x.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _write_rows_kernel(
    src_ptr, src_stride, rows_ptr, count_ptr, slot_mapping_ptr, cache_ptr, cache_stride,
    col_offset, WIDTH: tl.constexpr, BLOCK: tl.constexpr, SRC_BY_TOKEN: tl.constexpr,
    COUNTED: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    if COUNTED:
        if i >= tl.load(count_ptr):
            return
    token = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if SRC_BY_TOKEN:
        src_row = token
    else:
        src_row = i
    _copy_row(src_ptr + src_row * src_stride, cache_ptr + slot * cache_stride + col_offset,
              WIDTH, BLOCK)


def write_rows(
    src: torch.Tensor,  # [R, C], or [T, C] with src_by_token (columns contiguous)
    rows: torch.Tensor,  # [R] token of each row (any integer dtype)
    slot_mapping: torch.Tensor,  # [T] slot of each token
    cache: torch.Tensor,  # [num_slots, width]
    col_offset: int,
    src_by_token: bool = False,
    count: torch.Tensor | None = None,
) -> None:
    """Write row ``i`` of ``src`` (``src[rows[i]]`` with ``src_by_token``: a tensor
    of every token, no gather needed) at token ``rows[i]``'s slot, columns
    ``col_offset:col_offset + C``. With ``count`` (int32 [1] on the device, as
    ``select_rows`` leaves it) only the first ``count`` entries of ``rows`` are
    written: the launch covers them all and the rest return at once, so the host
    never needs to know how many there are."""
    R = rows.shape[0]
    if R == 0:
        return
    _write_rows_kernel[(R,)](
        src, src.stride(0), rows, rows if count is None else count, slot_mapping, cache,
        cache.stride(0), col_offset,
        **write_rows_constexprs(src.shape[1], src_by_token, count is not None),
    )


def write_rows_constexprs(width: int, src_by_token: bool, counted: bool = False) -> dict:
    return dict(WIDTH=width, BLOCK=min(1024, triton.next_power_of_2(width)),
                SRC_BY_TOKEN=src_by_token, COUNTED=counted)


def write_rows_reference(src, rows, slot_mapping, cache, col_offset,
                         src_by_token: bool = False,
                         count: torch.Tensor | None = None) -> None:
    """Twin of ``write_rows``."""
    if count is not None:
        rows = rows[: int(count)]
        src = src if src_by_token else src[: int(count)]
    C = src.shape[1]
    slots = slot_mapping[rows.long()].long()
    cache[slots, col_offset : col_offset + C] = (
        src[rows.long()] if src_by_token else src
    ).to(cache.dtype)


@triton.jit
def _write_kv_rows_kernel(
    k_ptr, k_stride, v_ptr, v_stride, rows_ptr, slot_mapping_ptr, cache_ptr, cache_stride,
    K_OFFSET: tl.constexpr, V_OFFSET: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    token = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    _copy_row(k_ptr + i * k_stride, cache_ptr + slot * cache_stride + K_OFFSET, WIDTH, BLOCK)
    _copy_row(v_ptr + i * v_stride, cache_ptr + slot * cache_stride + V_OFFSET, WIDTH, BLOCK)


def write_kv_rows(
    k: torch.Tensor,  # [R, kv_width] (columns contiguous)
    v: torch.Tensor,  # [R, kv_width]
    rows: torch.Tensor,  # [R] token of each row
    slot_mapping: torch.Tensor,
    cache: torch.Tensor,
    layout: DareCacheLayout,
) -> None:
    """``write_rows`` of K and V (same rows) in one launch."""
    R = rows.shape[0]
    if R == 0:
        return
    _write_kv_rows_kernel[(R,)](
        k, k.stride(0), v, v.stride(0), rows, slot_mapping, cache, cache.stride(0),
        **write_kv_rows_constexprs(layout),
    )


def write_kv_rows_constexprs(layout: DareCacheLayout) -> dict:
    return dict(K_OFFSET=layout.k_offset, V_OFFSET=layout.v_offset, WIDTH=layout.kv_width,
                BLOCK=min(1024, triton.next_power_of_2(layout.kv_width)))


def write_kv_rows_reference(k, v, rows, slot_mapping, cache, layout) -> None:
    """Twin of ``write_kv_rows``."""
    write_rows_reference(k, rows, slot_mapping, cache, layout.k_offset)
    write_rows_reference(v, rows, slot_mapping, cache, layout.v_offset)


# --------------------------------------------------------------------- predictor


@triton.jit
def _decide_reuse_kernel(
    q_ptr, q_stride, slot_mapping_ptr, cache_ptr, cache_stride,
    tau_kv_ptr, tau_o_ptr, flags_ptr, qref_follows_kv_ptr, reuse_counts_ptr,
    o_out_ptr, o_out_stride, eps,
    QREF_OFFSET: tl.constexpr, O_OFFSET: tl.constexpr, NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PER_HEAD: tl.constexpr, WRITE_QREF: tl.constexpr, COUNT: tl.constexpr,
    GATHER_O: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < NUM_HEADS
    mask = h_mask[:, None] & (d < HEAD_DIM)[None, :]
    cols = h[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + token * q_stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(cache_ptr + slot * cache_stride + QREF_OFFSET + cols, mask=mask,
                other=0.0).to(tl.float32)
    diff = tl.sum((q - r) * (q - r), axis=1)  # [BLOCK_H]
    ref = tl.sum(r * r, axis=1)
    if PER_HEAD:
        # deltas are >= 0, so padded heads (0) never win the max
        delta = tl.max(tl.where(h_mask, tl.sqrt(diff) / (tl.sqrt(ref) + eps), 0.0), axis=0)
    else:
        delta = tl.sqrt(tl.sum(diff, axis=0)) / (tl.sqrt(tl.sum(ref, axis=0)) + eps)
    reuse_kv = (delta <= tl.load(tau_kv_ptr + token)).to(tl.int8)
    reuse_o = (delta <= tl.load(tau_o_ptr + token)).to(tl.int8)
    tl.store(flags_ptr + token * 4 + 0, reuse_kv)
    tl.store(flags_ptr + token * 4 + 1, reuse_o)
    tl.store(flags_ptr + token * 4 + 2, (reuse_kv == 0).to(tl.int8))
    tl.store(flags_ptr + token * 4 + 3, (reuse_o == 0).to(tl.int8))
    if COUNT:
        # The token's reuse counters over the step's layers (only this program
        # touches its row).
        count_kv = reuse_counts_ptr + token * 2
        tl.store(count_kv, tl.load(count_kv) + reuse_kv.to(tl.int32))
        tl.store(count_kv + 1, tl.load(count_kv + 1) + reuse_o.to(tl.int32))
    if GATHER_O:
        # A reused O row is the layer's output for the token: copied from the cache
        # (before any O slot of this step is rewritten, which only happens to
        # recomputed rows, after this launch).
        if reuse_o != 0:
            o = tl.load(cache_ptr + slot * cache_stride + O_OFFSET + cols, mask=mask)
            tl.store(o_out_ptr + token * o_out_stride + cols, o.to(o_out_ptr.dtype.element_ty),
                     mask=mask)
    if WRITE_QREF:
        # The token's query becomes its Q_ref when what Q_ref follows (its K/V, or
        # its O) is recomputed. Only this program reads or writes this slot.
        follows_kv = tl.load(qref_follows_kv_ptr + token) != 0
        if tl.where(follows_kv, reuse_kv, reuse_o) == 0:
            q_raw = tl.load(q_ptr + token * q_stride + cols, mask=mask, other=0.0)
            tl.store(cache_ptr + slot * cache_stride + QREF_OFFSET + cols,
                     q_raw.to(cache_ptr.dtype.element_ty), mask=mask)


def decide_reuse(
    q: torch.Tensor,  # [T, num_heads * head_dim]
    slot_mapping: torch.Tensor,  # [T]
    cache: torch.Tensor,  # [num_slots, width]
    layout: DareCacheLayout,
    tau_kv: torch.Tensor,  # float32 [T]; a token reuses its K/V when delta <= tau_kv
    tau_o: torch.Tensor,  # float32 [T]; ... its O when delta <= tau_o
    per_head: bool,
    qref_follows_kv: torch.Tensor | None = None,  # bool [T]; None: no Q_ref write
    reuse_counts: torch.Tensor | None = None,  # int32 [T, 2]; None: not counted
    o_out: torch.Tensor | None = None,  # [T, num_heads * head_dim]; None: no O gather
    eps: float = 1e-6,
    scratch: RowSelectionScratch | None = None,  # the flags are written to its own
) -> torch.Tensor:
    """Bool ``[T, 4]``: K/V reused, O reused, K/V recomputed, O recomputed.

    The delta is the relative L2 change of the token's query against its Q_ref,
    over the whole row, or (``per_head``) the largest of the per-head changes.
    A negative threshold never passes (deltas are >= 0; NaN passes none).

    In the same launch, each optional:

    * ``qref_follows_kv``: the query of every token whose K/V (where that is True)
      or O (where False) is recomputed is written to its Q_ref slot, after its
      delta was taken (the step's Q_ref rewrite);
    * ``reuse_counts``: the token's two reuse flags (K/V, O) are added to its row
      (the per-token counters of a step, summed over its layers);
    * ``o_out``: the cached O row of every token whose O is reused is copied into
      its row (the rows of recomputed O are left for the caller to fill)."""
    T = q.shape[0]
    flags = (scratch.flags if scratch is not None
             else torch.empty(T, 4, dtype=torch.int8, device=q.device))
    if T:
        write = qref_follows_kv is not None
        _decide_reuse_kernel[(T,)](
            q, q.stride(0), slot_mapping, cache, cache.stride(0), tau_kv, tau_o, flags,
            qref_follows_kv.view(torch.int8) if write else flags,
            reuse_counts if reuse_counts is not None else flags,
            o_out if o_out is not None else q, o_out.stride(0) if o_out is not None else 0,
            eps,
            **decide_reuse_constexprs(layout, per_head, write, reuse_counts is not None,
                                      o_out is not None),
        )
    return flags.view(torch.bool)


def decide_reuse_constexprs(layout: DareCacheLayout, per_head: bool, write_qref: bool,
                            count: bool = False, gather_o: bool = False) -> dict:
    # (``layout.o_offset`` raises for a cache that keeps no O rows.)
    return dict(QREF_OFFSET=layout.qref_offset, O_OFFSET=layout.o_offset if gather_o else 0,
                NUM_HEADS=layout.num_heads, BLOCK_H=triton.next_power_of_2(layout.num_heads),
                HEAD_DIM=layout.head_dim, BLOCK_D=triton.next_power_of_2(layout.head_dim),
                PER_HEAD=per_head, WRITE_QREF=write_qref, COUNT=count, GATHER_O=gather_o)


def decide_reuse_reference(q, slot_mapping, cache, layout, tau_kv, tau_o, per_head: bool,
                           qref_follows_kv=None, reuse_counts=None, o_out=None,
                           eps: float = 1e-6) -> torch.Tensor:
    """Twin of ``decide_reuse``."""
    head, tok = query_delta_reference(q, slot_mapping, cache, layout, eps)
    delta = head.amax(dim=-1) if per_head else tok
    reuse = torch.stack((delta <= tau_kv, delta <= tau_o), dim=1)
    if reuse_counts is not None:
        reuse_counts += reuse.to(reuse_counts.dtype)
    if o_out is not None:
        o_cols = slice(layout.o_offset, layout.o_offset + layout.q_width)
        for t in range(q.shape[0]):
            if bool(reuse[t, 1]):
                o_out[t] = cache[int(slot_mapping[t]), o_cols].to(o_out.dtype)
    if qref_follows_kv is not None:
        cols = slice(layout.qref_offset, layout.qref_offset + layout.q_width)
        for t in range(q.shape[0]):
            if not bool(reuse[t, 0] if qref_follows_kv[t] else reuse[t, 1]):
                cache[int(slot_mapping[t]), cols] = q[t].to(cache.dtype)
    return torch.cat((reuse, ~reuse), dim=1)


def query_delta_reference(q, slot_mapping, cache, layout, eps: float = 1e-6):
    """(per-head [T, H], per-token [T]) relative L2 change of the query against its
    Q_ref, fp32."""
    T, H, D = q.shape[0], layout.num_heads, layout.head_dim
    ref = cache[slot_mapping.long(), layout.qref_offset : layout.qref_offset + H * D]
    qf, rf = q.float().view(T, H, D), ref.float().view(T, H, D)
    diff = (qf - rf).pow(2).sum(-1)
    norm = rf.pow(2).sum(-1)
    head = diff.sqrt() / (norm.sqrt() + eps)
    tok = diff.sum(-1).sqrt() / (norm.sum(-1).sqrt() + eps)
    return head, tok


# --------------------------------------------------------------------- row lists


@triton.jit
def _select_rows_kernel(
    flags_ptr, query_start_loc_ptr, num_reqs, num_tokens,
    rows_ptr, req_row_start_ptr, counts_ptr, totals_ptr, prefix_ptr, BLOCK: tl.constexpr,
):
    # One program per list: 0 = K/V recomputed (flag column 2), 1 = O recomputed
    # (column 3). One scan over the batch's tokens writes the list and, per token,
    # how many tokens before it were selected; a request's start in the list is
    # that count at its first token.
    which = tl.program_id(0)
    rows_ptr += which.to(tl.int64) * num_tokens
    prefix_ptr += which.to(tl.int64) * (num_tokens + 1)
    req_row_start_ptr += which * (num_reqs + 1)
    carry = tl.zeros([], dtype=tl.int32)
    for start in range(0, num_tokens, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid = t < num_tokens
        f = tl.load(flags_ptr + t.to(tl.int64) * 4 + which + 2, mask=valid, other=0)
        f = (f != 0).to(tl.int32)
        before = carry + tl.cumsum(f, axis=0) - f
        tl.store(prefix_ptr + t, before, mask=valid)
        tl.store(rows_ptr + before, t.to(tl.int64), mask=f != 0)
        carry += tl.sum(f, axis=0)
    tl.store(prefix_ptr + num_tokens, carry)
    tl.store(counts_ptr + which, carry)
    tl.store(totals_ptr + which, tl.load(totals_ptr + which) + carry)
    for start in range(carry, num_tokens, BLOCK):  # the rest: 0, a valid token id
        t = start + tl.arange(0, BLOCK)
        tl.store(rows_ptr + t, tl.zeros([BLOCK], dtype=tl.int64), mask=t < num_tokens)
    tl.debug_barrier()  # the prefix counts, written above, are read back below
    for start in range(0, num_reqs + 1, BLOCK):
        b = start + tl.arange(0, BLOCK)
        valid = b <= num_reqs
        first = tl.load(query_start_loc_ptr + b, mask=valid, other=0)
        tl.store(req_row_start_ptr + b, tl.load(prefix_ptr + first, mask=valid, other=0),
                 mask=valid)


def select_rows(
    flags: torch.Tensor,  # bool [T, 4] from ``decide_reuse``
    query_start_loc: torch.Tensor,  # [num_reqs + 1], the batch's
    totals: torch.Tensor,  # int32 [2]: each list's length is added to it
    scratch: RowSelectionScratch | None = None,  # the results are written to its own
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two row lists of a step (K/V recomputed, O recomputed), on the device
    with no host sync: ``(rows [2, T] int64, req_row_start [2, num_reqs + 1] int32,
    counts [2] int32)``. List ``l`` holds, first, the ``counts[l]`` selected tokens in token
    order (so grouped by request), then zeros; ``req_row_start[l, b]`` is where
    request ``b``'s tokens start in it (``req_row_start[l, num_reqs] ==
    counts[l]``), as ``paged_attention_rows`` takes it. ``totals`` (a layer's
    counters over a step) gets the counts added."""
    T = flags.shape[0]
    num_reqs = query_start_loc.shape[0] - 1
    if scratch is None:
        scratch = RowSelectionScratch(T, num_reqs, flags.device)
    rows, req_row_start, counts, prefix = (scratch.rows, scratch.req_row_start,
                                           scratch.counts, scratch.prefix)
    _select_rows_kernel[(2,)](
        flags.view(torch.int8), query_start_loc, num_reqs,
        T, rows, req_row_start, counts, totals, prefix, **select_rows_constexprs())
    return rows, req_row_start, counts


def select_rows_constexprs() -> dict:
    return dict(BLOCK=1024)


def select_rows_reference(flags, query_start_loc, totals):
    """Twin of ``select_rows``."""
    counts = torch.zeros(2, dtype=torch.int32, device=flags.device)
    T = flags.shape[0]
    num_reqs = query_start_loc.shape[0] - 1
    picks = [flags[:, 2], flags[:, 3]]
    rows = torch.zeros(2, T, dtype=torch.int64, device=flags.device)
    starts = torch.zeros(2, num_reqs + 1, dtype=torch.int32, device=flags.device)
    for which, pick in enumerate(picks):
        chosen = [t for t in range(T) if bool(pick[t])]
        rows[which, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
        counts[which] = len(chosen)
        totals[which] += len(chosen)
        for b in range(num_reqs + 1):
            starts[which, b] = sum(1 for t in chosen if t < int(query_start_loc[b]))
    return rows, starts, counts


# --------------------------------------------------------------------- projections


@triton.jit
def _project_rows_kernel(
    x_ptr, x_stride, w_ptr, w_stride, bias_ptr,
    rows_ptr, count_ptr, slot_mapping_ptr,
    positions_ptr, cos_sin_ptr, cos_sin_stride,
    out_ptr, out_stride, out_col, out2_ptr, out2_stride, out2_col,
    IN_FEATURES: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ROPE_HEADS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_AT_SLOT: tl.constexpr, HAS_OUT2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FULL_HEAD: tl.constexpr,
    FP32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program per (tile of BLOCK_M listed rows, output head of 2 * HALF
    # columns). The epilogue works on the head's two halves, so that rotary
    # embedding (rotate-half, as LLaDA and Dream use it) can pair them: with
    # FULL_HEAD (HALF a power of two) the product is one dot over the whole head,
    # split in registers afterwards; else one dot per half.
    tile = tl.program_id(0)
    head = tl.program_id(1)
    count = tl.load(count_ptr)
    if tile * BLOCK_M >= count:  # fewer rows were selected
        return
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = m < count
    token = tl.load(rows_ptr + m, mask=m_valid, other=0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    j_valid = j < HALF
    n_lo = (head * (2 * HALF) + j).to(tl.int64)
    n_hi = n_lo + HALF
    if FULL_HEAD:
        n = (head * (2 * HALF) + tl.arange(0, 2 * HALF)).to(tl.int64)
        acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
        for k0 in range(0, IN_FEATURES, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_valid = k < IN_FEATURES
            a = tl.load(x_ptr + token[:, None] * x_stride + k[None, :],
                        mask=m_valid[:, None] & k_valid[None, :], other=0.0)
            w = tl.load(w_ptr + n[None, :] * w_stride + k[:, None], mask=k_valid[:, None],
                        other=0.0)
            if FP32_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
    else:
        acc_lo = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
        for k0 in range(0, IN_FEATURES, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_valid = k < IN_FEATURES
            a = tl.load(x_ptr + token[:, None] * x_stride + k[None, :],
                        mask=m_valid[:, None] & k_valid[None, :], other=0.0)
            w_mask = k_valid[:, None] & j_valid[None, :]
            w_lo = tl.load(w_ptr + n_lo[None, :] * w_stride + k[:, None], mask=w_mask,
                           other=0.0)
            w_hi = tl.load(w_ptr + n_hi[None, :] * w_stride + k[:, None], mask=w_mask,
                           other=0.0)
            if FP32_DOT:
                a = a.to(tl.float32)
                w_lo = w_lo.to(tl.float32)
                w_hi = w_hi.to(tl.float32)
            acc_lo = tl.dot(a, w_lo, acc_lo, input_precision=DOT_PRECISION)
            acc_hi = tl.dot(a, w_hi, acc_hi, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc_lo += tl.load(bias_ptr + n_lo, mask=j_valid, other=0.0).to(tl.float32)[None, :]
        acc_hi += tl.load(bias_ptr + n_hi, mask=j_valid, other=0.0).to(tl.float32)[None, :]
    if ROPE_HEADS > 0:
        if head < ROPE_HEADS:
            pos = tl.load(positions_ptr + token, mask=m_valid, other=0).to(tl.int64)
            cs_mask = m_valid[:, None] & j_valid[None, :]
            cs = cos_sin_ptr + pos[:, None] * cos_sin_stride + j[None, :]
            cos = tl.load(cs, mask=cs_mask, other=0.0).to(tl.float32)
            sin = tl.load(cs + HALF, mask=cs_mask, other=0.0).to(tl.float32)
            rot_lo = acc_lo * cos - acc_hi * sin
            rot_hi = acc_hi * cos + acc_lo * sin
            acc_lo = rot_lo
            acc_hi = rot_hi
    out_mask = m_valid[:, None] & j_valid[None, :]
    if OUT_AT_SLOT or HAS_OUT2:
        slot = tl.load(slot_mapping_ptr + token, mask=m_valid, other=0).to(tl.int64)
    if OUT_AT_SLOT:
        dst = out_ptr + slot[:, None] * out_stride + out_col
    else:
        dst = out_ptr + token[:, None] * out_stride + out_col
    cols = head * (2 * HALF) + j[None, :]
    tl.store(dst + cols, acc_lo.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dst + cols + HALF, acc_hi.to(out_ptr.dtype.element_ty), mask=out_mask)
    if HAS_OUT2:
        dst2 = out2_ptr + slot[:, None] * out2_stride + out2_col + cols
        tl.store(dst2, acc_lo.to(out2_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dst2 + HALF, acc_hi.to(out2_ptr.dtype.element_ty), mask=out_mask)


def project_rows(
    x: torch.Tensor,  # [T, in], row t the input of token t (columns contiguous)
    weight: torch.Tensor,  # [out, in] (an ``nn.Linear`` weight), out a multiple of head_dim
    bias: torch.Tensor | None,  # [out]
    rows: torch.Tensor,  # int64 [T]: the listed tokens (``select_rows``)
    count: torch.Tensor,  # int32 [1] on the device: how many of ``rows`` to compute
    head_dim: int,
    out: torch.Tensor,  # written at row ``rows[i]`` (or its slot), columns out_col..
    out_col: int = 0,
    slot_mapping: torch.Tensor | None = None,  # [T] slot of each token
    out_at_slot: bool = False,  # ``out`` is a cache: row ``slot_mapping[rows[i]]``
    out2: torch.Tensor | None = None,  # a cache also written, at the rows' slots
    out2_col: int = 0,
    positions: torch.Tensor | None = None,  # [T], with rope
    cos_sin_cache: torch.Tensor | None = None,  # [max_position, head_dim]: cos | sin
    rope_heads: int = 0,  # rotary embedding on the first rope_heads heads of the output
    tiles: dict | None = None,  # overrides of BLOCK_M, BLOCK_K, FULL_HEAD, num_warps, num_stages
) -> None:
    """``y_i = x[rows[i]] @ weight.T + bias`` for the first ``count`` listed rows
    only, then (``rope_heads``) neox rotary embedding of the leading heads at the
    rows' positions, stored straight to ``out`` (and ``out2``): the K/V projection
    of the recomputed tokens writes their cache slots with no intermediate tensor,
    the output projection of the recomputed rows writes the layer's output rows and
    their O cache slots. The grid covers every row of the list, and tiles past
    ``count`` return at once: no host sync. Products on the tensor cores in the
    weights' dtype (IEEE fp32 for fp32) with fp32 accumulation; bias and rotary
    embedding on the fp32 accumulator, one rounding at the store."""
    T = rows.shape[0]
    n_out = weight.shape[0]
    if T == 0:
        return
    if n_out % head_dim or head_dim % 2:
        raise ValueError(f"project_rows: {n_out} outputs are not whole heads of {head_dim}")
    if slot_mapping is None and (out_at_slot or out2 is not None):
        raise ValueError("project_rows: a cache output is addressed through slot_mapping")
    if rope_heads and (positions is None or cos_sin_cache is None):
        raise ValueError("project_rows: rope_heads needs positions and cos_sin_cache")
    meta = project_rows_constexprs(x.shape[1], head_dim, weight.dtype, rope_heads,
                                   bias is not None,
                                   out_at_slot=out_at_slot,
                                   has_out2=out2 is not None, rows=T)
    _override(meta, tiles, "project_rows", {"BLOCK_M", "BLOCK_K", "FULL_HEAD"})
    grid = (triton.cdiv(T, meta["BLOCK_M"]), n_out // head_dim)
    dummy = rows  # for pointers a variant never reads
    _project_rows_kernel[grid](
        x, x.stride(0), weight, weight.stride(0), dummy if bias is None else bias,
        rows, count, dummy if slot_mapping is None else slot_mapping,
        dummy if positions is None else positions,
        dummy if cos_sin_cache is None else cos_sin_cache,
        0 if cos_sin_cache is None else cos_sin_cache.stride(0),
        out, out.stride(0), out_col,
        dummy if out2 is None else out2, 0 if out2 is None else out2.stride(0), out2_col,
        **meta,
    )


def project_rows_constexprs(in_features: int, head_dim: int, dtype: torch.dtype,
                            rope_heads: int, has_bias: bool,
                            out_at_slot: bool, has_out2: bool, rows: int) -> dict:
    """The compile-time and launch parameters ``project_rows`` runs its kernel with
    (``rows``: the length of the row list). The 16-bit tiles are the fastest of
    ``benchmarks/kernel_tiles.py --kernel project_rows`` on an H100 (geometric mean
    over LLaDA-8B's and Dream-7B's K/V and output projections, under and over 1024
    rows): one dot over the whole head when its half is a power of two. fp32 (not
    tuned) keeps 32 x 32 tiles, as its operands take twice the shared memory."""
    fp32 = dtype == torch.float32
    half = head_dim // 2
    block_half = max(16, triton.next_power_of_2(half))
    if fp32:
        tiles = dict(BLOCK_M=32, BLOCK_K=32, FULL_HEAD=False)
    elif rows < 1024:
        tiles = dict(BLOCK_M=64, BLOCK_K=64, FULL_HEAD=half == block_half, num_warps=4,
                     num_stages=4)
    else:
        tiles = dict(BLOCK_M=128, BLOCK_K=64, FULL_HEAD=half == block_half, num_warps=4,
                     num_stages=3)
    return dict(
        IN_FEATURES=in_features, HALF=half, BLOCK_HALF=block_half,
        ROPE_HEADS=rope_heads, HAS_BIAS=has_bias,
        OUT_AT_SLOT=out_at_slot, HAS_OUT2=has_out2, **tiles,
        FP32_DOT=fp32 or _interpreted(), DOT_PRECISION="ieee" if fp32 else "tf32",
    )


def project_rows_reference(x, weight, bias, rows, count, head_dim, out, out_col=0,
                           slot_mapping=None, out_at_slot=False, out2=None, out2_col=0,
                           positions=None, cos_sin_cache=None, rope_heads=0) -> None:
    """Twin of ``project_rows``, in fp32, one row at a time."""
    half = head_dim // 2
    for i in range(int(count)):
        token = int(rows[i])
        src = x[token].float()
        y = weight.float() @ src + (0 if bias is None else bias.float())
        if rope_heads:
            cos_sin = cos_sin_cache[int(positions[token])].float()
            cos, sin = cos_sin[:half], cos_sin[half:]
            heads = y[: rope_heads * head_dim].view(rope_heads, 2, half)
            lo, hi = heads[:, 0].clone(), heads[:, 1].clone()
            heads[:, 0] = lo * cos - hi * sin
            heads[:, 1] = hi * cos + lo * sin
        row = int(slot_mapping[token]) if out_at_slot else token
        out[row, out_col : out_col + y.shape[0]] = y.to(out.dtype)
        if out2 is not None:
            slot = int(slot_mapping[token])
            out2[slot, out2_col : out2_col + y.shape[0]] = y.to(out2.dtype)
