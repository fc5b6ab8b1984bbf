"""DARE Triton kernels against their PyTorch twins (on CPU under the Triton
interpreter; on a GPU when one is present): GQA and MHA, head dims 64/128, odd
lengths, several requests, block sizes 16/32/128, all-reuse, no-reuse and random
row selections."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_dare.attention_backends import torch_dare_ops, triton_dare_kernels
from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.row_selection_scratch import RowSelectionScratch
from vllm_dare.attention_backends.triton_dare_kernels import (
    decide_reuse_reference,
    paged_attention_rows_reference,
    project_rows_reference,
    query_delta_reference,
    select_rows_reference,
    write_kv_rows_reference,
    write_rows_reference,
)

# Each implementation against the loop twins: the Triton kernels (interpreted on
# CPU) and the vectorised PyTorch ops the CPU build runs.
IMPLS = {"triton": triton_dare_kernels, "torch": torch_dare_ops}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(seq_lens, block_size, layout, seed, dtype=torch.float32):
    """A paged cache holding random rows for requests of the given lengths, with
    shuffled physical blocks, and the batch's slot mapping (tokens in order)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_req):
        block_table[r, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    cache = torch.randn(num_blocks * block_size, layout.width, generator=g).to(dtype)
    slot_mapping = torch.cat([
        block_table[r, torch.arange(n) // block_size].long() * block_size
        + torch.arange(n) % block_size
        for r, n in enumerate(seq_lens)
    ])
    token_req = torch.cat([torch.full((n,), r) for r, n in enumerate(seq_lens)])
    return (cache.to(DEVICE), block_table.to(DEVICE), slot_mapping.to(DEVICE),
            token_req.to(DEVICE), g)


def _selection(kind, T, g):
    if kind == "none":  # everything reused: nothing computed
        return torch.zeros(0, dtype=torch.int64)
    if kind == "all":  # nothing reused
        return torch.arange(T)
    return torch.nonzero(torch.rand(T, generator=g) < 0.3).squeeze(-1)


HEADS = [(4, 4, 64), (8, 2, 64), (4, 1, 128)]  # (heads, kv heads, head_dim): MHA, GQA, MQA
ALL_CASES = list(itertools.product(HEADS, [16, 32, 128], ["none", "all", "random"]))
CASES = [(impl, *c) for impl in IMPLS for c in ALL_CASES]


@pytest.mark.parametrize("impl,heads,block_size,selection", CASES)
def test_paged_attention_rows_matches_twin(impl, heads, block_size, selection):
    H, Hkv, D = heads
    layout = DareCacheLayout(H, Hkv, D)
    seq_lens = [19, 3, 34]  # odd lengths, several requests
    cache, block_table, _, token_req, g = _batch(seq_lens, block_size, layout, seed=H + block_size)
    T = sum(seq_lens)
    q = torch.randn(T, H, D, generator=g).to(DEVICE)
    rows = _selection(selection, T, g).to(DEVICE)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    sentinel = 7.0
    out = torch.full((T, H, D), sentinel, device=DEVICE)
    want = out.clone()
    args = (layout, block_table, seq, rows.to(torch.int32), token_req[rows].to(torch.int32))
    IMPLS[impl].paged_attention_rows(q, cache, *args, out, block_size, D**-0.5)
    paged_attention_rows_reference(q, cache, *args, want, block_size, D**-0.5)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    # Rows that were not selected are not touched (their work is skipped).
    untouched = torch.ones(T, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert (out[untouched] == sentinel).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128)])
def test_paged_attention_rows_every_row_with_request_starts(impl, heads):
    """Every row selected, int64 row ids, and each request's first row given (the
    batch's query_start_loc), as the layer step calls it with nothing reused."""
    H, Hkv, D = heads
    layout = DareCacheLayout(H, Hkv, D)
    seq_lens = [70, 5, 33]
    cache, block_table, _, token_req, g = _batch(seq_lens, 16, layout, seed=H + D)
    T = sum(seq_lens)
    q = torch.randn(T, H, D, generator=g).to(DEVICE)
    rows = torch.arange(T, device=DEVICE)
    starts = torch.tensor([0, 70, 75, 108], dtype=torch.int32, device=DEVICE)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.zeros(T, H, D, device=DEVICE)
    want = out.clone()
    args = (layout, block_table, seq, rows, token_req.to(torch.int32))
    IMPLS[impl].paged_attention_rows(q, cache, *args, out, 16, D**-0.5, max_rows_per_req=70,
                                     req_row_start=starts)
    paged_attention_rows_reference(q, cache, *args, want, 16, D**-0.5)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern", ["long-all", "long-random", "skip-middle-request"])
def test_paged_attention_rows_tiles(impl, pattern):
    """Requests with more selected rows than one tile of the Triton kernel (64), and
    a request with no selected row between two that have some."""
    layout = DareCacheLayout(4, 2, 64)
    seq_lens = [150, 7, 90]
    cache, block_table, _, token_req, g = _batch(seq_lens, 16, layout, seed=11)
    T = sum(seq_lens)
    q = torch.randn(T, 4, 64, generator=g).to(DEVICE)
    if pattern == "long-all":
        rows = torch.arange(T)
    elif pattern == "long-random":
        rows = torch.nonzero(torch.rand(T, generator=g) < 0.6).squeeze(-1)
    else:
        rows = torch.cat([torch.arange(0, 150, 2), torch.arange(157, T, 3)])
    rows = rows.to(DEVICE)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.zeros(T, 4, 64, device=DEVICE)
    want = out.clone()
    args = (layout, block_table, seq, rows.to(torch.int32), token_req[rows].to(torch.int32))
    # The grid bound is the longest request (150 rows), as the layer step passes it.
    IMPLS[impl].paged_attention_rows(q, cache, *args, out, 16, 0.125, max_rows_per_req=150)
    paged_attention_rows_reference(q, cache, *args, want, 16, 0.125)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_attention_rows_bf16(impl):
    layout = DareCacheLayout(4, 2, 64)
    cache, block_table, _, token_req, g = _batch([19, 33], 16, layout, 5, torch.bfloat16)
    T = 52
    q = torch.randn(T, 4, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    rows = torch.arange(0, T, 3, device=DEVICE)
    seq = torch.tensor([19, 33], dtype=torch.int32, device=DEVICE)
    out = torch.zeros(T, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    want = out.clone()
    args = (layout, block_table, seq, rows.to(torch.int32), token_req[rows].to(torch.int32))
    IMPLS[impl].paged_attention_rows(q, cache, *args, out, 16, 0.125)
    paged_attention_rows_reference(q, cache, *args, want, 16, 0.125)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_lens", [[100, 37], [1100, 30]], ids=["64-1023-rows", "1024-rows-up"])
def test_paged_attention_rows_bf16_tuned_tiles(impl, seq_lens):
    """bf16 with a row list of 64 to 1023 rows and of 1024 or more: the two tile
    shapes tuned on an H100 (64 x 128 and 128 x 64 keys, two stages)."""
    layout = DareCacheLayout(2, 1, 32)
    cache, block_table, _, token_req, g = _batch(seq_lens, 16, layout, 8, torch.bfloat16)
    T = sum(seq_lens)
    q = torch.randn(T, 2, 32, generator=g).to(torch.bfloat16).to(DEVICE)
    rows = torch.arange(T, device=DEVICE)
    starts = torch.tensor([0, seq_lens[0], T], dtype=torch.int32, device=DEVICE)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.zeros(T, 2, 32, dtype=torch.bfloat16, device=DEVICE)
    want = out.clone()
    args = (layout, block_table, seq, rows, token_req.to(torch.int32))
    IMPLS[impl].paged_attention_rows(q, cache, *args, out, 16, 32**-0.5,
                                     max_rows_per_req=max(seq_lens), req_row_start=starts)
    paged_attention_rows_reference(q, cache, *args, want, 16, 32**-0.5)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    meta = triton_dare_kernels.paged_attention_constexprs(layout, 16, T, torch.bfloat16)
    assert meta["BLOCK_M"] == (64 if T < 1024 else 128)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("selection", ["none", "all", "random"])
@pytest.mark.parametrize("block_size", [16, 128])
def test_write_rows_matches_twin(impl, selection, block_size):
    layout = DareCacheLayout(8, 2, 64)
    cache, _, slot_mapping, _, g = _batch([13, 40, 7], block_size, layout, seed=3)
    T = 60
    rows = _selection(selection, T, g).to(DEVICE)
    before = cache.clone()
    for offset, width in [(layout.k_offset, layout.kv_width), (layout.v_offset, layout.kv_width),
                          (layout.o_offset, layout.q_width), (layout.qref_offset, layout.q_width)]:
        src = torch.randn(rows.shape[0], width, generator=g).to(DEVICE)
        got, want = cache.clone(), cache.clone()
        IMPLS[impl].write_rows(src, rows.to(torch.int32), slot_mapping, got, offset)
        write_rows_reference(src, rows, slot_mapping, want, offset)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Slots of rows that were not selected keep their cached values.
    untouched = torch.ones(T, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    IMPLS[impl].write_rows(torch.zeros(rows.shape[0], layout.width, device=DEVICE),
                           rows.to(torch.int32), slot_mapping, cache, 0)
    assert torch.equal(cache[slot_mapping[untouched]], before[slot_mapping[untouched]])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("selection", ["none", "all", "random"])
def test_write_rows_from_token_rows_and_write_kv_rows_match_twins(impl, selection):
    """``src_by_token``: the source holds every token (Q_ref from the query, no
    gather); ``write_kv_rows``: K and V of the same rows in one launch. int64 rows."""
    layout = DareCacheLayout(8, 2, 64)
    cache, _, slot_mapping, _, g = _batch([13, 40, 7], 32, layout, seed=4)
    T = 60
    rows = _selection(selection, T, g).to(DEVICE)
    q = torch.randn(T, layout.q_width, generator=g).to(DEVICE)
    got, want = cache.clone(), cache.clone()
    IMPLS[impl].write_rows(q, rows, slot_mapping, got, layout.qref_offset, src_by_token=True)
    write_rows_reference(q, rows, slot_mapping, want, layout.qref_offset, src_by_token=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the twin itself: token rows[i]'s slot holds q[rows[i]]
    qref = want[slot_mapping[rows], layout.qref_offset : layout.qref_offset + layout.q_width]
    assert torch.equal(qref, q[rows])
    k = torch.randn(rows.shape[0], layout.kv_width, generator=g).to(DEVICE)
    kv = torch.randn(rows.shape[0], 2 * layout.kv_width, generator=g).to(DEVICE)
    v = kv[:, layout.kv_width :]  # a strided view, as a split projection gives
    got, want = cache.clone(), cache.clone()
    IMPLS[impl].write_kv_rows(k, v, rows, slot_mapping, got, layout)
    write_kv_rows_reference(k, v, rows, slot_mapping, want, layout)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    untouched = torch.ones(T, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(got[slot_mapping[untouched]], cache[slot_mapping[untouched]])


def test_query_delta_twin_measures_the_relative_change():
    layout = DareCacheLayout(8, 2, 128)
    cache, _, slot_mapping, _, g = _batch([21, 9], 32, layout, seed=9)
    T = 30
    qref = cache[slot_mapping, layout.qref_offset : layout.qref_offset + layout.q_width]
    q = qref + 0.1 * torch.randn(T, layout.q_width, generator=g).to(DEVICE)
    q[:5] = qref[:5]  # unchanged queries: delta exactly 0
    head, tok = query_delta_reference(q, slot_mapping, cache, layout)
    assert (tok[:5] == 0).all() and (tok[5:] > 0).all() and (head[:5] == 0).all()
    # The relative change is what was injected: ||0.1 * noise|| / ||qref|| ~ 0.1.
    assert 0.05 < float(tok[5:].median()) < 0.2
    assert (head.amax(-1) >= tok - 1e-6).all()  # the largest head moves at least as much


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128), (28, 4, 128)])
@pytest.mark.parametrize("per_head", [False, True])
def test_decide_reuse_matches_twin(impl, heads, per_head):
    H, Hkv, D = heads
    layout = DareCacheLayout(H, Hkv, D)
    cache, _, slot_mapping, _, g = _batch([21, 9], 32, layout, seed=9)
    T = 30
    qref = cache[slot_mapping, layout.qref_offset : layout.qref_offset + H * D]
    scale = torch.rand(T, 1, generator=g) * 0.3  # changes from 0 to ~0.3
    q = qref + (scale * torch.randn(T, H * D, generator=g)).to(DEVICE)
    q[:5] = qref[:5]  # unchanged queries: delta exactly 0
    tau_kv = (torch.rand(T, generator=g) * 0.3).to(DEVICE)
    tau_o = (torch.rand(T, generator=g) * 0.3).to(DEVICE)
    tau_kv[[0, 7]] = -1.0  # never reuse, even at delta 0
    tau_o[[1, 8]] = -1.0
    flags = IMPLS[impl].decide_reuse(q, slot_mapping, cache, layout, tau_kv, tau_o, per_head)
    want = decide_reuse_reference(q, slot_mapping, cache, layout, tau_kv, tau_o, per_head)
    assert flags.dtype == torch.bool and flags.shape == (T, 4)
    assert torch.equal(flags, want)
    assert torch.equal(flags[:, 2:], ~flags[:, :2])
    assert flags[2:5, :2].all() and not flags[0, 0] and not flags[1, 1]
    # Both outcomes occur: the thresholds split the tokens.
    assert 0 < int(flags[5:, 0].sum()) < T - 5 and 0 < int(flags[5:, 1].sum()) < T - 5
    # With the Q_ref rewrite: same flags (taken before the write), and the query
    # written to the Q_ref slot of exactly the tokens whose K/V (where Q_ref
    # follows K/V) or O (elsewhere) are recomputed; every other cache entry kept.
    follows_kv = (torch.rand(T, generator=g) < 0.5).to(DEVICE)
    got_cache, want_cache = cache.clone(), cache.clone()
    flags = IMPLS[impl].decide_reuse(q, slot_mapping, got_cache, layout, tau_kv, tau_o,
                                     per_head, follows_kv)
    want = decide_reuse_reference(q, slot_mapping, want_cache, layout, tau_kv, tau_o, per_head,
                                  follows_kv)
    assert torch.equal(flags, want)
    assert torch.equal(got_cache, want_cache)
    rewritten = torch.where(follows_kv, flags[:, 2], flags[:, 3])
    assert 0 < int(rewritten.sum()) < T
    cols = slice(layout.qref_offset, layout.qref_offset + H * D)
    assert torch.equal(want_cache[slot_mapping[rewritten], cols], q[rewritten].to(cache.dtype))
    assert torch.equal(want_cache[slot_mapping[~rewritten]], cache[slot_mapping[~rewritten]])
    kept = torch.ones(cache.shape[0], dtype=torch.bool, device=DEVICE)
    kept[slot_mapping] = False
    assert torch.equal(want_cache[kept], cache[kept])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decide_reuse_counts_and_gathers_reused_o(impl, dtype):
    """The per-token reuse counters get the flags added, and the cached O row of
    every token that reuses O is copied into ``o_out`` (other rows untouched), in
    the same launch as the decision and the Q_ref rewrite."""
    H, Hkv, D = 8, 2, 64
    layout = DareCacheLayout(H, Hkv, D)
    cache, _, slot_mapping, _, g = _batch([13, 20], 16, layout, seed=4, dtype=dtype)
    T = 33
    qref = cache[slot_mapping, layout.qref_offset : layout.qref_offset + H * D].float()
    q = (qref + (torch.rand(T, 1, generator=g) * 0.3 * torch.randn(T, H * D, generator=g)
                 ).to(DEVICE)).to(dtype)
    tau_kv = (torch.rand(T, generator=g) * 0.3).to(DEVICE)
    tau_o = (torch.rand(T, generator=g) * 0.3).to(DEVICE)
    follows_kv = (torch.rand(T, generator=g) < 0.5).to(DEVICE)
    counts = torch.randint(0, 5, (T, 2), generator=g, dtype=torch.int32).to(DEVICE)
    sentinel = torch.full((T, H * D), 7.0, dtype=dtype, device=DEVICE)
    got = (cache.clone(), counts.clone(), sentinel.clone())
    want = (cache.clone(), counts.clone(), sentinel.clone())
    flags = IMPLS[impl].decide_reuse(q, slot_mapping, got[0], layout, tau_kv, tau_o, False,
                                     follows_kv, reuse_counts=got[1], o_out=got[2])
    want_flags = decide_reuse_reference(q, slot_mapping, want[0], layout, tau_kv, tau_o,
                                        False, follows_kv, reuse_counts=want[1],
                                        o_out=want[2])
    assert torch.equal(flags, want_flags)
    for got_t, want_t in zip(got, want):
        assert torch.equal(got_t, want_t)
    reuse_o = flags[:, 1]
    assert 0 < int(reuse_o.sum()) < T and 0 < int(flags[:, 0].sum()) < T
    assert torch.equal(got[1] - counts, flags[:, :2].to(torch.int32))
    o_cols = slice(layout.o_offset, layout.o_offset + layout.q_width)
    assert torch.equal(got[2][reuse_o], cache[slot_mapping[reuse_o], o_cols])
    assert (got[2][~reuse_o] == 7.0).all()


def _flags(T, g, kind):
    """decide_reuse-shaped flags: reuse columns, then their negation."""
    if kind == "all":  # every row recomputed
        reuse = torch.zeros(T, 2, dtype=torch.bool)
    elif kind == "none":  # every row reused
        reuse = torch.ones(T, 2, dtype=torch.bool)
    else:
        reuse = torch.rand(T, 2, generator=g) < 0.7
    return torch.cat((reuse, ~reuse), dim=1).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["none", "all", "random"])
@pytest.mark.parametrize("batch", ["few", "many"])
def test_select_rows_matches_twin(impl, kind, batch):
    """Row lists on the device: selected tokens first in token order, then zeros;
    per-request starts; the lengths, also added to a running total. Requests of
    lengths 0 (none selected from an empty request) to 1100 (more than one scan
    block); more requests than one block of starts."""
    g = torch.Generator().manual_seed(5)
    lengths = [7, 1100, 0, 1, 33] if batch == "few" else [1] * 1030 + [0, 3]
    T = sum(lengths)
    qsl = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    flags = _flags(T, g, kind)
    got_totals = torch.tensor([5, 6], dtype=torch.int32, device=DEVICE)
    want_totals = got_totals.cpu().clone()
    rows, starts, counts = IMPLS[impl].select_rows(flags, qsl, got_totals)
    want_rows, want_starts, want_counts = select_rows_reference(flags.cpu(), qsl.cpu(),
                                                                want_totals)
    assert torch.equal(rows.cpu(), want_rows) and torch.equal(starts.cpu(), want_starts)
    assert torch.equal(counts.cpu(), want_counts)
    assert torch.equal(got_totals.cpu(), want_totals)
    # the twin itself: list 1 is the O-recomputed tokens, the tail zeros
    n = int(want_counts[1])
    assert torch.equal(want_rows[1, :n], flags[:, 3].cpu().nonzero().view(-1))
    assert (want_rows[1, n:] == 0).all() and int(want_starts[1, -1]) == n
    assert int(want_totals[1]) == 6 + n
    assert rows.shape == (2, T) and starts.shape == (2, len(lengths) + 1)
    if kind == "random":
        assert 0 < n < T


@pytest.mark.parametrize("impl", IMPLS)
def test_decide_reuse_refuses_to_gather_o_from_a_cache_without_o(impl):
    layout = DareCacheLayout(4, 2, 64, has_o=False)  # an engine whose max_mode is kv
    cache, _, slot_mapping, _, _ = _batch([5], 16, layout, seed=1)
    q = torch.zeros(5, layout.q_width, device=DEVICE)
    taus = torch.full((5,), 0.1, device=DEVICE)
    with pytest.raises(ValueError, match="keeps no O rows"):
        IMPLS[impl].decide_reuse(q, slot_mapping, cache, layout, taus, taus, False,
                                 o_out=torch.empty_like(q))


def test_selection_scratch_shared_by_successive_layers():
    """``decide_reuse`` and ``select_rows`` given a ``RowSelectionScratch`` write their
    results into it (the layers of a step share one, allocating nothing) and
    overwrite all of what an earlier layer's selection left there."""
    ops = triton_dare_kernels
    H, Hkv, D = 4, 2, 64
    layout = DareCacheLayout(H, Hkv, D)
    cache, _, slot_mapping, _, g = _batch([40, 1, 25], 16, layout, seed=6)
    T = 66
    qsl = torch.tensor([0, 40, 41, T], dtype=torch.int32, device=DEVICE)
    scratch = RowSelectionScratch(T, 3, torch.device(DEVICE))
    qref = cache[slot_mapping, layout.qref_offset : layout.qref_offset + H * D]
    for tau in (0.2, 0.05):  # two layers: many rows reused, then few
        q = qref + (torch.rand(T, 1, generator=g) * 0.3 * torch.randn(T, H * D, generator=g)
                    ).to(DEVICE)
        taus = torch.full((T,), tau, device=DEVICE)
        flags = ops.decide_reuse(q, slot_mapping, cache, layout, taus, taus, False,
                                 scratch=scratch)
        assert flags.data_ptr() == scratch.flags.data_ptr()
        assert torch.equal(flags, decide_reuse_reference(q, slot_mapping, cache, layout, taus,
                                                         taus, False))
        totals = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        got = ops.select_rows(flags, qsl, totals, scratch)
        want = select_rows_reference(flags.cpu(), qsl.cpu(), torch.zeros(2, dtype=torch.int32))
        for got_t, want_t, own in zip(got, want, (scratch.rows, scratch.req_row_start,
                                                  scratch.counts)):
            assert got_t.data_ptr() == own.data_ptr()
            assert torch.equal(got_t.cpu(), want_t)
        assert 0 < int(want[2][0]) < T


def _rope_table(max_position, head_dim, g):
    angles = torch.rand(max_position, head_dim // 2, generator=g) * 6.3
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads,dtype", [((8, 2, 64), torch.float32), ((4, 4, 128), torch.float32),
                                         ((4, 2, 64), torch.bfloat16), ((2, 1, 24), torch.float32)])
@pytest.mark.parametrize("kind", ["none", "all", "random"])
def test_project_rows_into_the_cache_matches_twin(impl, heads, dtype, kind):
    """The K/V projection of the listed rows with bias and rotary embedding of the
    keys, stored at the rows' slots; the slots of unlisted rows keep their values.
    Head dim 24: a half that is no power of two (padded tiles)."""
    H, Hkv, D = heads
    layout = DareCacheLayout(H, Hkv, D)
    g = torch.Generator().manual_seed(H * D)
    cache, _, slot_mapping, _, g = _batch([21, 45], 16, layout, seed=H + D, dtype=dtype)
    T, hidden = 66, H * D
    x = torch.randn(T, hidden, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(2 * Hkv * D, hidden, generator=g) / hidden**0.5).to(dtype).to(DEVICE)
    b = torch.randn(2 * Hkv * D, generator=g).to(dtype).to(DEVICE)
    positions = torch.cat([torch.arange(21), torch.arange(45)]).to(DEVICE)
    cos_sin = _rope_table(64, D, g).to(DEVICE)
    flags = _flags(T, g, kind)
    lists, _, counts = torch_dare_ops.select_rows(flags, torch.tensor([0, 21, T], device=DEVICE),
                                                  torch.zeros(2, dtype=torch.int32, device=DEVICE))
    rows = lists[0]
    got, want = cache.clone(), cache.clone()
    args = (x, w, b, rows, counts[0:1], D)
    kwargs = dict(slot_mapping=slot_mapping, out_at_slot=True, positions=positions,
                  cos_sin_cache=cos_sin, rope_heads=Hkv)
    IMPLS[impl].project_rows(*args, got, layout.k_offset, **kwargs)
    project_rows_reference(*args, want, layout.k_offset, **kwargs)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    n = int(counts[0])
    listed = torch.zeros(T, dtype=torch.bool, device=DEVICE)
    listed[rows[:n]] = True
    assert torch.equal(got[slot_mapping[~listed]], cache[slot_mapping[~listed]])
    if n:
        # the twin itself: values are the plain projection; keys rotate pairs
        # (d, d + D/2), which keeps each pair's norm
        t = int(rows[0])
        y = (x[t].float() @ w.float().T + b.float())
        stored = want[slot_mapping[t], : 2 * Hkv * D].float()
        torch.testing.assert_close(stored[Hkv * D :], y[Hkv * D :], **tol)
        pair = lambda v: (v.view(Hkv, 2, D // 2) ** 2).sum(1)  # noqa: E731
        torch.testing.assert_close(pair(stored[: Hkv * D]), pair(y[: Hkv * D]), **tol)
        assert not torch.allclose(stored[: Hkv * D], y[: Hkv * D], **tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [200, 1100], ids=["under-1024-rows", "1024-rows-up"])
def test_project_rows_bf16_tuned_tiles(impl, T):
    """bf16 K/V projection (bias, RoPE) of a random 60% of T rows: one dot over the
    whole head, with the tiles tuned on an H100 for lists under and over 1024 rows
    (64 and 128 rows per tile)."""
    layout = DareCacheLayout(2, 1, 32)
    cache, _, slot_mapping, _, g = _batch([T], 16, layout, seed=T, dtype=torch.bfloat16)
    hidden = 64
    x = torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(64, hidden, generator=g) / hidden**0.5).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(64, generator=g).to(torch.bfloat16).to(DEVICE)
    positions = torch.arange(T, device=DEVICE)
    cos_sin = _rope_table(T, 32, g).to(DEVICE)
    flags = _flags(T, g, "random")
    lists, _, counts = torch_dare_ops.select_rows(flags, torch.tensor([0, T], device=DEVICE),
                                                  torch.zeros(2, dtype=torch.int32, device=DEVICE))
    got, want = cache.clone(), cache.clone()
    args = (x, w, b, lists[0], counts[0:1], 32)
    kwargs = dict(slot_mapping=slot_mapping, out_at_slot=True, positions=positions,
                  cos_sin_cache=cos_sin, rope_heads=1)
    IMPLS[impl].project_rows(*args, got, layout.k_offset, **kwargs)
    project_rows_reference(*args, want, layout.k_offset, **kwargs)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=3e-2)
    meta = triton_dare_kernels.project_rows_constexprs(hidden, 32, torch.bfloat16, 1, True,
                                                       True, False, rows=T)
    assert meta["FULL_HEAD"] and meta["BLOCK_M"] == (64 if T < 1024 else 128)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["none", "all", "random"])
def test_project_rows_to_tokens_and_cache_and_counted_writes_match_twins(impl, kind):
    """The output projection of the listed rows (no bias, no rotary embedding) to
    the layer output's token rows and their O slots; ``write_rows`` of the first
    ``count`` listed rows."""
    layout = DareCacheLayout(8, 2, 64)
    cache, _, slot_mapping, _, g = _batch([13, 40, 7], 32, layout, seed=6)
    T, hidden = 60, 8 * 64
    attn = torch.randn(T, layout.q_width, generator=g).to(DEVICE)
    w = (torch.randn(hidden, layout.q_width, generator=g) / hidden**0.5).to(DEVICE)
    flags = _flags(T, g, kind)
    lists, _, counts = torch_dare_ops.select_rows(flags,
                                                  torch.tensor([0, 13, 53, T], device=DEVICE),
                                                  torch.zeros(2, dtype=torch.int32,
                                                              device=DEVICE))
    rows = lists[1]
    out = torch.full((T, hidden), 7.0, device=DEVICE)
    got, want = (out.clone(), cache.clone()), (out.clone(), cache.clone())
    for impl_fn, (o, c) in [(IMPLS[impl].project_rows, got), (project_rows_reference, want)]:
        impl_fn(attn, w, None, rows, counts[1:2], 64, o, slot_mapping=slot_mapping,
                out2=c, out2_col=layout.o_offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    n = int(counts[1])
    assert int((want[0] != 7.0).any(dim=1).sum()) == n  # only the listed rows written
    q = torch.randn(T, layout.q_width, generator=g).to(DEVICE)
    got, want = cache.clone(), cache.clone()
    IMPLS[impl].write_rows(q, rows, slot_mapping, got, layout.qref_offset,
                           src_by_token=True, count=counts[1:2])
    write_rows_reference(q, rows[:n], slot_mapping, want, layout.qref_offset,
                         src_by_token=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
