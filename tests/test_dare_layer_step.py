"""One DARE attention layer step (``dare_attention_step``) on an explicit batch:
the model-side path that decides reuse, skips the K/V and output projections of
reused tokens, attends only the recomputed rows and serves the reused rows' projected
outputs from the paged cache. Checked against dense attention in plain PyTorch with
both kernel sets: the vectorised PyTorch ops and the Triton kernels (interpreted on
CPU, compiled on a GPU when one is present)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_dare.attention_backends import torch_dare_ops, triton_dare_kernels

from vllm_dare.attention_backends.dare_layer_step import (
    DareProjections,
    DareRuntime,
    DareStepInputs,
    dare_attention_step,
)
from vllm_dare.attention_backends.dare_metadata import DareMetadata, full_sequence_len
from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(rtol=1e-5, atol=1e-5) if DEVICE.type == "cpu" else dict(rtol=2e-4, atol=2e-4)

H, HKV, D, BLOCK = 4, 2, 16, 16
SEQ_LENS = [9, 14]
OPS = pytest.mark.parametrize("ops", [torch_dare_ops, triton_dare_kernels],
                              ids=["torch", "triton"])


def _rope_cache(max_position: int) -> torch.Tensor:
    """cos | sin of rotate-half rotary embedding, as vLLM's ``cos_sin_cache``."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads * D] rotated at the rows' cos | sin [n, D]."""
    n = x.shape[0]
    x = x.view(n, -1, D)
    lo, hi = x[..., : D // 2], x[..., D // 2 :]
    cos, sin = cos_sin[:, None, : D // 2], cos_sin[:, None, D // 2 :]
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1).view(n, -1)


class _RecordingOps:
    """The kernel set, recording how many rows each ``project_rows`` computes."""

    def __init__(self, ops, layer):
        self._ops, self._layer = ops, layer
        self.counter = None  # an OpCounter the recording's own read must not reach

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def paged_attention_rows(self, *args, **kwargs):
        self._layer.paged_attention_calls += 1
        return self._ops.paged_attention_rows(*args, **kwargs)

    def dense_attention(self, *args, **kwargs):
        self._layer.dense_attention_calls += 1
        return self._ops.dense_attention(*args, **kwargs)

    def project_rows(self, x, weight, bias, rows, count, *args, **kwargs):
        calls = self._layer.kv_calls if weight is self._layer.w_kv else self._layer.o_calls
        if self.counter is None:
            calls.append(int(count))
        else:
            with self.counter.paused_for():
                calls.append(int(count))
        return self._ops.project_rows(x, weight, bias, rows, count, *args, **kwargs)


class Layer:
    """Random projections (keys with rotary embedding) and a paged batch of two
    requests. ``kv_calls`` / ``o_calls``: the rows each K/V and output projection
    computed, through the model's layers or the recomputed-rows kernel."""

    def __init__(self, ops, seq_lens=SEQ_LENS, full_sequences: bool = False):
        g = torch.Generator().manual_seed(0)
        self.seq_lens = seq_lens
        hidden = H * D
        self.layout = DareCacheLayout(H, HKV, D)
        self.w_q = torch.randn(H * D, hidden, generator=g) / hidden**0.5
        self.w_kv = torch.randn(2 * HKV * D, hidden, generator=g) / hidden**0.5
        self.w_o = torch.randn(hidden, H * D, generator=g) / hidden**0.5
        self.T = sum(seq_lens)
        self.x = torch.randn(self.T, hidden, generator=g)
        # request 1's blocks come first in the pool but are listed second: paging
        block_table = torch.tensor([[2, 3], [0, 1]], dtype=torch.int32)
        slots, token_req = [], []
        for r, n in enumerate(seq_lens):
            for p in range(n):
                slots.append(int(block_table[r, p // BLOCK]) * BLOCK + p % BLOCK)
                token_req.append(r)
        self.meta = DareMetadata(
            num_actual_tokens=self.T, num_reqs=2,
            query_start_loc=torch.tensor([0, seq_lens[0], self.T]),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=block_table,
            slot_mapping=torch.tensor(slots), token_req=torch.tensor(token_req, dtype=torch.int32),
            causal=False, max_query_len=max(seq_lens),
            full_sequence_len=seq_lens[0] if full_sequences else None,
        )
        self.cache = torch.randn(4 * BLOCK, self.layout.width, generator=g)
        for name in ("w_q", "w_kv", "w_o", "x", "cache"):
            setattr(self, name, getattr(self, name).to(DEVICE))
        self.meta = DareMetadata(**{
            k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
            for k, v in vars(self.meta).items()
        })
        self.positions = torch.cat([torch.arange(n) for n in seq_lens]).to(DEVICE)
        self.cos_sin = _rope_cache(max(seq_lens)).to(DEVICE)
        self.runtime = DareRuntime(1, per_head=False, device=DEVICE)
        self.runtime.ops = _RecordingOps(ops, self)
        # False: no plain weights (vLLM's CPU build): selected rows go through the
        # model's layers
        self.plain_weights = True
        self.kv_calls: list[int] = []
        self.kv_rows: list = []
        self.o_calls: list[int] = []
        self.paged_attention_calls = self.dense_attention_calls = 0

    def step(self, force: torch.Tensor | None, tau: float = 0.05,
             keeps: tuple[bool, bool] | None = None) -> torch.Tensor:
        """One forward: ``force`` None is a step without DARE inputs (everything
        recomputed and cached); ``keeps`` (Q_ref, O) given is a step of requests that
        reuse nothing, whose batch keeps that state or not."""
        if keeps is not None:
            no = torch.zeros(self.T, device=DEVICE)
            force = torch.ones(self.T, dtype=torch.bool, device=DEVICE)
            self.runtime.begin_step(DareStepInputs(force, no, no, torch.ones_like(force), False,
                                                   keeps_reference=keeps[0], keeps_o=keeps[1]), 2)
        elif force is None:
            self.runtime.begin_step(None, 2)
        else:
            force = force.to(DEVICE)
            t = torch.full((self.T,), tau, device=DEVICE)
            # (both requests reuse: their forced rows count as forced by rule)
            self.runtime.begin_step(DareStepInputs(force, t, t, torch.ones_like(force), True,
                                                   reusing=torch.ones_like(force)), 2)

        q = self.x @ self.w_q.T
        return dare_attention_step(self.meta, self.cache, BLOCK, 0, self.runtime, self.layout,
                                   D**-0.5, q, self.projections())

    def projections(self) -> DareProjections:
        def project_kv(rows):
            self.kv_rows.append(rows)
            self.kv_calls.append(self.x[rows].shape[0])
            kv = self.x[rows] @ self.w_kv.T
            k = _rope(kv[:, : HKV * D], self.cos_sin[self.positions[rows]])
            return k, kv[:, HKV * D :].contiguous()

        def project_o(o):
            self.o_calls.append(o.shape[0])
            return o @ self.w_o.T

        plain = self.plain_weights
        return DareProjections(project_kv, project_o, self.x, self.w_kv if plain else None,
                               None, self.w_o if plain else None, self.positions, self.cos_sin)

    def dense(self, project: bool = True) -> torch.Tensor:
        """Exact bidirectional attention (+ output projection) of every token."""
        outs, start = [], 0
        for n in self.seq_lens:
            x = self.x[start : start + n]
            start += n
            q = (x @ self.w_q.T).view(n, H, D).transpose(0, 1)
            k, v = (x @ self.w_kv.T).split(HKV * D, dim=-1)
            k = _rope(k, self.cos_sin[:n]).reshape(n, HKV, D).transpose(0, 1).repeat_interleave(H // HKV, 0)
            v = v.reshape(n, HKV, D).transpose(0, 1).repeat_interleave(H // HKV, 0)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=False)
            o = o.transpose(0, 1).reshape(n, H * D)
            outs.append(o @ self.w_o.T if project else o)
        return torch.cat(outs)


@OPS
def test_first_step_computes_every_row_exactly(ops):
    layer = Layer(ops)
    out = layer.step(None)
    torch.testing.assert_close(out, layer.dense(), **TOL)
    assert layer.kv_calls == [layer.T] and layer.o_calls == [layer.T]
    assert layer.runtime.layer_counts[0].tolist() == [layer.T, 0, 0]


def test_full_sequence_len_only_for_whole_equal_unpadded_sequences():
    lens = torch.tensor([12, 12, 12])
    assert full_sequence_len(lens, 36, 12) == 12
    assert full_sequence_len(torch.tensor([12, 11, 13]), 36, 13) is None  # unequal
    assert full_sequence_len(lens, 36, 20) is None  # a cached prefix may precede
    assert full_sequence_len(lens, 40, 12) is None  # padding tokens after the queries
    assert full_sequence_len(torch.tensor([], dtype=torch.long), 0, 0) is None


@OPS
def test_whole_equal_sequences_recomputed_attend_on_their_own_keys_and_values(ops):
    # Two requests of 12 tokens, every query its whole sequence: a step that
    # recomputes every row attends on the step's keys and values (dense), with the
    # same output and the same cache as through the paged cache; a step that reuses
    # rows reads the cache.
    paged = Layer(ops, seq_lens=[12, 12])
    dense = Layer(ops, seq_lens=[12, 12], full_sequences=True)
    for layer in (paged, dense):
        out = layer.step(None)
        torch.testing.assert_close(out, layer.dense(), **TOL)
    assert (paged.paged_attention_calls, paged.dense_attention_calls) == (1, 0)
    assert (dense.paged_attention_calls, dense.dense_attention_calls) == (0, 1)
    torch.testing.assert_close(dense.cache, paged.cache, **TOL)
    everything = torch.ones(dense.T, dtype=torch.bool)
    torch.testing.assert_close(dense.step(everything), dense.dense(), **TOL)  # forced
    assert dense.dense_attention_calls == 2
    force = torch.zeros(dense.T, dtype=torch.bool)
    force[[3, 17]] = True
    torch.testing.assert_close(dense.step(force), dense.dense(), **TOL)
    assert (dense.paged_attention_calls, dense.dense_attention_calls) == (1, 2)
    assert dense.kv_calls[-1] == 2 and dense.o_calls[-1] == 2


@OPS
@pytest.mark.parametrize("plain_weights", [True, False], ids=["kernel", "model-layers"])
def test_reused_rows_skip_projections_and_attention_and_come_from_the_cache(ops, plain_weights):
    layer = Layer(ops)
    layer.plain_weights = plain_weights
    first = layer.step(None)
    layer.kv_calls.clear()
    layer.o_calls.clear()
    force = torch.zeros(layer.T, dtype=torch.bool)
    force[[0, 5, 11, 20]] = True
    # Same inputs: every unforced token has query delta 0 and is reused.
    second = layer.step(force)
    assert layer.kv_calls == [4] and layer.o_calls == [4]
    torch.testing.assert_close(second, first, **TOL)
    assert layer.runtime.layer_counts[0].tolist() == [layer.T, layer.T - 4, layer.T - 4]


@OPS
@pytest.mark.parametrize("plain_weights", [True, False], ids=["kernel", "model-layers"])
def test_changed_token_recomputes_and_reused_rows_keep_their_cached_output(ops, plain_weights):
    layer = Layer(ops)
    layer.plain_weights = plain_weights
    first = layer.step(None)
    noise = torch.randn(layer.x.shape[1], generator=torch.Generator().manual_seed(1))
    layer.x[3] = noise.to(DEVICE)
    force = torch.zeros(layer.T, dtype=torch.bool)
    force[3] = True  # its input changed (just unmasked)
    out = layer.step(force, tau=1e-3)
    # Token 3's query moved, so by the predictor only row 3 is recomputed, with the
    # new K/V of token 3 in its request's attention.
    want = layer.dense()
    torch.testing.assert_close(out[3], want[3], **TOL)
    kept = torch.ones(layer.T, dtype=torch.bool, device=DEVICE)
    kept[3] = False
    assert torch.equal(out[kept], first[kept])
    # Its request's other rows did change in the exact output: reuse is a real
    # approximation here, not a no-op.
    assert not torch.allclose(want[: SEQ_LENS[0]][kept[: SEQ_LENS[0]]],
                              first[: SEQ_LENS[0]][kept[: SEQ_LENS[0]]], atol=1e-4)


@OPS
def test_query_drift_above_tau_recomputes_without_forcing(ops):
    """No row forced: the drifted token alone is recomputed (its K/V and its
    attention row over the cache, in which only its own K/V changed), every other
    row is served from the cache as the previous step left it."""
    layer = Layer(ops)
    before = layer.step(None)
    layer.x[15] *= 1.5  # the query of token 15 moves by 50% (relative)
    layer.kv_calls.clear()
    layer.o_calls.clear()
    out = layer.step(torch.zeros(layer.T, dtype=torch.bool), tau=0.2)
    assert layer.kv_calls == [1] and layer.o_calls == [1]
    dense = layer.dense()
    torch.testing.assert_close(out[15], dense[15], **TOL)
    others = torch.arange(layer.T, device=DEVICE) != 15
    torch.testing.assert_close(out[others], before[others], **TOL)
    # Token 15's request (rows 9..22) reused O rows that its new K/V made stale.
    assert not torch.allclose(out[9:15], dense[9:15], **TOL)


@OPS
def test_batch_that_keeps_no_dare_state_writes_only_k_and_v_and_projects_its_input_as_is(ops):
    """DARE mode off for every request: the output is exact, K/V are cached, and the
    Q_ref and O columns, which no request will read, are left as they were. With
    every K/V row recomputed, ``project_kv`` gets the whole input (no row gather)."""
    layout = DareCacheLayout(H, HKV, D)
    q_ref = slice(layout.qref_offset, layout.qref_offset + layout.q_width)
    o = slice(layout.o_offset, layout.o_offset + layout.q_width)
    kv = slice(layout.k_offset, layout.v_offset + layout.kv_width)
    for keeps in [(False, False), (True, False), (True, True)]:
        layer = Layer(ops)
        slots = layer.meta.slot_mapping
        before = layer.cache[slots].clone()
        out = layer.step(None, keeps=keeps)
        torch.testing.assert_close(out, layer.dense(), **TOL)
        after = layer.cache[slots]
        assert not torch.equal(after[:, kv], before[:, kv])  # K/V written
        assert torch.equal(after[:, q_ref], before[:, q_ref]) != keeps[0], keeps
        assert torch.equal(after[:, o], before[:, o]) != keeps[1], keeps
        if keeps[0]:
            torch.testing.assert_close(after[:, q_ref], layer.x @ layer.w_q.T, **TOL)
        if keeps[1]:
            torch.testing.assert_close(after[:, o], out, **TOL)
        assert layer.kv_rows == [slice(0, layer.T)]


@OPS
@pytest.mark.parametrize("max_mode", ["kv+o", "kv", "off"])
def test_attend_all_rows_through_vllms_cache_view(ops, max_mode, monkeypatch):
    """The backend's plain forward (``DareAttentionImpl``: full Q/K/V handed over
    through vLLM's ``Attention`` op) on a cache in vLLM's logical
    ``[blocks, kv_heads, block_size, C]`` view: dense attention of every row, K/V
    (and Q_ref where kept) written at the tokens' slots."""
    from vllm_dare.attention_backends.dare_layer_step import attend_all_rows

    monkeypatch.setenv("VLLM_DARE_KERNELS", "torch" if ops is torch_dare_ops else "triton")
    layer = Layer(ops)
    layout = DareCacheLayout.for_max_mode(H, HKV, D, max_mode)
    # Token-major storage, handed over as vLLM's permuted logical view.
    storage = torch.zeros(4, BLOCK, HKV, layout.width // HKV, device=DEVICE)
    kv_cache = storage.permute(0, 2, 1, 3)
    T = layer.T
    q = (layer.x @ layer.w_q.T).view(T, H, D)
    kv = layer.x @ layer.w_kv.T
    k = _rope(kv[:, : HKV * D], layer.cos_sin[layer.positions]).reshape(T, HKV, D)
    v = kv[:, HKV * D :].reshape(T, HKV, D)
    out = attend_all_rows(q, k, v, kv_cache, layer.meta, layout, D**-0.5)
    torch.testing.assert_close(out.reshape(T, H * D), layer.dense(project=False), **TOL)
    rows = storage.reshape(4 * BLOCK, layout.width)[layer.meta.slot_mapping]
    torch.testing.assert_close(rows[:, : HKV * D], k.reshape(T, -1), rtol=0, atol=0)
    torch.testing.assert_close(rows[:, HKV * D : 2 * HKV * D], v.reshape(T, -1), rtol=0, atol=0)
    if layout.has_qref:
        qref = rows[:, layout.qref_offset : layout.qref_offset + H * D]
        torch.testing.assert_close(qref, q.reshape(T, -1), rtol=0, atol=0)
    assert rows.shape[1] == 2 * HKV * D + layout.query_rows * H * D


@pytest.mark.parametrize("plain_weights", [True, False], ids=["kernel", "model-layers"])
def test_a_step_that_selects_rows_reads_nothing_back_from_the_device(plain_weights):
    """With the Triton kernels and the projections' plain weights, a layer that
    reuses rows queues all its work without waiting for the GPU: no op of the step
    reads a device value back (its row lists and their lengths stay on the device).
    Without plain weights (vLLM's CPU build) the two lengths are read, and only those."""
    from vllm_dare.tools.op_counter import OpCounter, triton_launches_counted

    layer = Layer(triton_dare_kernels)
    layer.plain_weights = plain_weights
    first = layer.step(None)
    force = torch.zeros(layer.T, dtype=torch.bool)
    force[[0, 5, 11, 20]] = True
    t = torch.full((layer.T,), 0.05, device=DEVICE)
    layer.runtime.begin_step(DareStepInputs(force.to(DEVICE), t, t,
                                            torch.ones_like(force, device=DEVICE), True), 2)
    q = layer.x @ layer.w_q.T
    counter = OpCounter()
    layer.runtime.ops.counter = counter
    with triton_launches_counted(counter), counter:
        out = dare_attention_step(layer.meta, layer.cache, BLOCK, 0, layer.runtime,
                                  layer.layout, D**-0.5, q, layer.projections())
    torch.testing.assert_close(out, first, **TOL)
    assert counter.syncs == ({} if plain_weights else {"_local_scalar_dense": 2})
    assert counter.work  # it counted the step's ops
    assert layer.kv_calls[-1] == 4 and layer.o_calls[-1] == 4


@OPS
def test_reuse_counts_add_up_over_the_runs_of_a_step(ops):
    """The per-layer counters sum every run between two ``begin_step`` calls (the
    layer benchmark times many runs of one step): tokens and reused rows alike."""
    layer = Layer(ops)
    layer.step(None)
    force = torch.zeros(layer.T, dtype=torch.bool)
    force[[0, 5, 11, 20]] = True
    layer.step(force)
    proj, q = layer.projections(), layer.x @ layer.w_q.T
    dare_attention_step(layer.meta, layer.cache, BLOCK, 0, layer.runtime, layer.layout,
                        D**-0.5, q, proj)
    T = layer.T
    assert layer.runtime.layer_counts[0].tolist() == [2 * T, 2 * (T - 4), 2 * (T - 4)]
    # two forced tokens in each request (0, 5 | 11, 20); per request: token-layer
    # rows, K/V and O reused, forced, and the rows the K/V and O predictor decided
    # on (all of them reused here)
    assert layer.runtime.request_counts.tolist() == [
        [2 * n, 2 * (n - 2), 2 * (n - 2), 2 * 2, 2 * (n - 2), 2 * (n - 2)] for n in SEQ_LENS]
