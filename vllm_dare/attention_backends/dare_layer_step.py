"""DARE self-attention of one layer: decide, per token, what to reuse, and compute
only the rest.

For every token processed in a step the layer computes its query (the layer input
is needed for it anyway), then the relative L2 change against the token's cached
reference query (``decide_reuse`` kernel). With ``delta <= tau`` (and the token not
forced to recompute):

* DARE-KV reuses the token's cached K/V: its key/value projection is not computed
  and its cache slots are not rewritten;
* DARE-O reuses the token's cached attention output: its attention row is not
  computed (``paged_attention_rows`` only runs the recomputed rows) and neither is
  its output projection; the cache holds the row after the projection (``o_proj``
  is row-wise and bias-free in LLaDA and Dream, so caching it before or after the
  projection gives the same output; after it, the reused row skips that matmul too).

Q_ref is rewritten only for tokens whose cached activations were recomputed: those
whose K/V were recomputed when the request reuses K/V, else those whose O was.
``tau = 0`` disables a reuse, so with both at 0 every row is recomputed. A batch
in which no request keeps DARE state (mode off) writes neither Q_ref nor O, and a
batch that recomputes every K/V row projects the layer input as it is (no gather).

A layer that selects rows does not sync with the host: the row lists and their
lengths stay on the device (``select_rows``) and every kernel after them covers
all tokens, with the work past a list's length skipped inside the kernel
(``project_rows`` projects only the listed rows). So the host queues the layers
ahead of the GPU instead of waiting for each layer's decision. The one exception
is a platform whose linear layers keep no plain weights (vLLM's CPU build), where
the selected rows go through the model's layers and their count is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_metadata import DareMetadata, slot_rows
from vllm_dare.attention_backends.dare_ops import dare_ops
from vllm_dare.attention_backends.row_selection_scratch import RowSelectionScratch


@dataclass
class DareStepInputs:
    """Per-token inputs of one forward, built by the ModelState."""

    force: torch.Tensor  # bool [T]: recompute everything for this token
    tau_kv: torch.Tensor  # float32 [T]; 0 = never reuse K/V
    tau_o: torch.Tensor  # float32 [T]; 0 = never reuse O
    kv_is_reference: torch.Tensor  # bool [T]: Q_ref follows K/V recomputes (else O's)
    any_reuse: bool  # False: every row is recomputed, skip the predictor
    # Whether any request of the batch may reuse later, i.e. reads this step's Q_ref
    # rows (DARE mode not off) or O rows (mode o or kv+o). When not, those cache
    # writes are skipped: in mode off the backend writes K/V only, like exact mode.
    keeps_reference: bool = True
    keeps_o: bool = True
    # bool [T]: the token's request reuses anything (its forced rows are counted
    # as forced by rule); None: no request does.
    reusing: torch.Tensor | None = None

    def select(self, tokens: torch.Tensor) -> DareStepInputs:
        """The inputs of the tokens a step plan feeds (``tokens``: their indices)."""
        return DareStepInputs(self.force[tokens], self.tau_kv[tokens], self.tau_o[tokens],
                              self.kv_is_reference[tokens], self.any_reuse,
                              self.keeps_reference, self.keeps_o,
                              None if self.reusing is None else self.reusing[tokens])


class DareRuntime:
    """Shared by the attention layers of one model: the step's inputs, what every
    layer derives from them (computed once per step), and the reuse counters of the
    step (per layer on the host, per token on the device, summed per request when
    asked)."""

    def __init__(self, num_layers: int, per_head: bool, device: torch.device,
                 max_mode: str = "kv+o"):
        self.num_layers = num_layers
        self.per_head = per_head
        self.max_mode = max_mode  # what the engine's requests may reuse: sizes the cache
        self.device = device
        self.step: DareStepInputs | None = None
        self.ops = dare_ops(device)
        self.num_reqs = 0
        # Per layer, this step: tokens (host), tokens of the runs that selected
        # rows (host), and how many K/V and O rows those recomputed (device,
        # int32 [layers, 2], added to by ``select_rows``; read once, when
        # ``layer_counts`` is asked).
        self._tokens = np.zeros(num_layers, dtype=np.int64)
        self._selected_tokens = np.zeros(num_layers, dtype=np.int64)
        self._recomputed: torch.Tensor | None = None
        self.all_rows: torch.Tensor | None = None
        self.kv_may_reuse = self.o_may_reuse = False
        self._token_reused: torch.Tensor | None = None  # int32 [T, 2], over layers
        self._token_req: torch.Tensor | None = None
        self._layers_run = 0
        # Storage the layers that select rows share within a step (they run one
        # after another on one stream): the selection, the attention rows.
        self._selection: RowSelectionScratch | None = None
        self._attention_rows: torch.Tensor | None = None

    def begin_step(self, step: DareStepInputs | None, num_reqs: int) -> None:
        self.step = step
        self.num_reqs = num_reqs
        self._tokens[:] = 0
        self._selected_tokens[:] = 0
        self._recomputed = None
        self._token_reused = None
        self._token_req = None
        self._layers_run = 0
        self._selection = self._attention_rows = None
        self.kv_may_reuse = self.o_may_reuse = False
        # Row ids 0..T-1 of the step's tokens, shared by its layers.
        self.all_rows = (None if step is None
                         else torch.arange(step.force.shape[0], device=self.device))
        if step is not None and step.any_reuse:
            # The thresholds the predictor compares with: -1 (never passes) for
            # tokens that may not reuse at all (forced, or tau 0).
            never = torch.full_like(step.tau_kv, -1.0)
            self.tau_kv = torch.where(~step.force & (step.tau_kv > 0), step.tau_kv, never)
            self.tau_o = torch.where(~step.force & (step.tau_o > 0), step.tau_o, never)
            # Batch-wide facts the layers branch on, in one host sync per step (none
            # per layer): whether any token may reuse its K/V, its O at all (if not,
            # that row list is every row).
            self.kv_may_reuse, self.o_may_reuse = torch.stack((
                (self.tau_kv > 0).any(), (self.tau_o > 0).any())).tolist()

    def recomputed_totals(self, layer_index: int, num_tokens: int) -> torch.Tensor:
        """int32 [2] on the device: the layer's K/V and O rows recomputed this step
        by runs that selected rows, for ``select_rows`` to add to (this run has
        ``num_tokens`` tokens)."""
        if self._recomputed is None:
            self._recomputed = torch.zeros(self.num_layers, 2, dtype=torch.int32,
                                           device=self.device)
        self._selected_tokens[layer_index] += num_tokens
        return self._recomputed[layer_index]

    @property
    def layer_counts(self) -> np.ndarray:
        """[layers, 3] this step: tokens, K/V rows reused, O rows reused (reading the
        device counters: one host sync)."""
        counts = np.zeros((self.num_layers, 3), dtype=np.int64)
        counts[:, 0] = self._tokens
        if self._recomputed is not None:
            recomputed = self._recomputed.cpu().numpy()
            counts[:, 1:] = self._selected_tokens[:, None] - recomputed
        return counts

    def selection_scratch(self, num_tokens: int, num_reqs: int) -> RowSelectionScratch:
        """What ``decide_reuse`` and ``select_rows`` write, shared by the step's layers."""
        s = self._selection
        if s is None or (s.num_tokens, s.num_reqs) != (num_tokens, num_reqs):
            s = self._selection = RowSelectionScratch(num_tokens, num_reqs, self.device)
        return s

    def attention_rows(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer for the attention rows a layer recomputes (its other rows hold
        whatever an earlier layer left there, which nothing reads), shared by the
        step's layers."""
        buf = self._attention_rows
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._attention_rows = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def token_reuse_counts(self, num_tokens: int) -> torch.Tensor:
        """int32 [T, 2] on the device: per token of the step, over its layers, how
        often its K/V and its O were reused; ``decide_reuse`` adds to it."""
        if self._token_reused is None:
            self._token_reused = torch.zeros(num_tokens, 2, dtype=torch.int32,
                                             device=self.device)
        return self._token_reused

    def count(self, layer_index: int, meta: DareMetadata) -> None:
        """Record a layer run on ``meta``'s tokens (the rows a run that selects rows
        reuses are counted on the device: ``recomputed_totals``,
        ``token_reuse_counts``)."""
        self._tokens[layer_index] += meta.num_actual_tokens
        self._layers_run += 1
        if self._token_req is None:
            self._token_req = meta.token_req

    @property
    def request_counts(self) -> torch.Tensor:
        """[num_reqs, 6] per request of the batch, summed over the layers run this
        step: token-layer rows, K/V rows reused, O rows reused, rows forced by rule
        (of requests that reuse), rows the K/V and the O predictor decided on (not
        forced, that reuse on): those it did not reuse, it refused."""
        counts = torch.zeros(self.num_reqs, 6, dtype=torch.int64, device=self.device)
        if self._token_req is None or not self.num_reqs:
            return counts
        token_req = self._token_req.long()
        per_token = torch.zeros(token_req.shape[0], 6, dtype=torch.int64, device=self.device)
        per_token[:, 0] = self._layers_run
        if self._token_reused is not None:
            per_token[:, 1:3] = self._token_reused.long()
        step = self.step
        if step is not None and step.force.shape[0] == token_req.shape[0]:
            free = ~step.force
            if step.reusing is not None:
                per_token[:, 3] = (step.force & step.reusing).long() * self._layers_run
            per_token[:, 4] = (free & (step.tau_kv > 0)).long() * self._layers_run
            per_token[:, 5] = (free & (step.tau_o > 0)).long() * self._layers_run
        counts.index_add_(0, token_req, per_token)
        return counts


def attend_all_rows(query, key, value, kv_cache, meta: DareMetadata, layout, scale):
    """Every row recomputed, for callers that hand over full Q/K/V through vLLM's
    ``Attention`` op: write K, V and Q_ref of all tokens and attend every row.

    The O rows are left alone: the cache holds O after the output projection,
    which only the model-side path (``dare_self_attention``) owns."""
    ops = dare_ops(query.device)
    T = meta.num_actual_tokens
    cache = slot_rows(kv_cache, layout, query.dtype)
    rows = torch.arange(T, device=query.device)
    q = query[:T].reshape(T, layout.q_width)
    slots = meta.slot_mapping
    ops.write_kv_rows(key[:T].reshape(T, layout.kv_width),
                      value[:T].reshape(T, layout.kv_width), rows, slots, cache, layout)
    if layout.has_qref:
        ops.write_rows(q, rows, slots, cache, layout.qref_offset)
    out = torch.empty(T, layout.num_heads, layout.head_dim, dtype=query.dtype, device=query.device)
    block_size = cache.shape[0] // kv_cache.shape[0]
    ops.paged_attention_rows(q.view(T, layout.num_heads, layout.head_dim), cache, layout,
                             meta.block_table, meta.seq_lens, rows, meta.token_req, out,
                             block_size, scale, max_rows_per_req=meta.max_query_len,
                             req_row_start=meta.query_start_loc)
    return out


# ``project_kv(rows)``: keys and values of the token rows ``rows`` selects (a tensor
# of row ids, or ``slice(0, T)`` for every row), ``[R, kv_width]`` each, columns
# contiguous (the row stride may be anything).
ProjectKV = Callable[[torch.Tensor | slice], tuple[torch.Tensor, torch.Tensor]]
ProjectO = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DareProjections:
    """A layer's K/V and output projections as the layer step runs them.

    ``project_kv`` / ``project_o`` are the model's own layers, used on every row
    (the step computes what exact mode computes, the same way). When only some rows
    are recomputed, the step runs ``ops.project_rows`` on the raw tensors instead:
    it reads the listed rows, projects them, applies rotary embedding to the keys
    and stores them straight into the cache (or the layer's output), with a row
    count that stays on the device."""

    project_kv: ProjectKV
    project_o: ProjectO
    x: torch.Tensor  # [T, hidden] the layer input
    # The plain weights, or None where the platform's linear layers keep none (vLLM's
    # CPU build prepacks them for its own GEMM): the selected rows then go through
    # ``project_kv`` / ``project_o``, which needs their count on the host (on the
    # CPU that costs nothing).
    kv_weight: torch.Tensor | None  # [2 * kv_width, hidden]: keys, then values
    kv_bias: torch.Tensor | None
    o_weight: torch.Tensor | None  # [hidden, q_width], no bias
    positions: torch.Tensor | None = None  # [T]; None: the keys get no rotary embedding
    cos_sin_cache: torch.Tensor | None = None  # [max_position, head_dim]: cos | sin, neox


def dare_attention_step(
    meta: DareMetadata,
    cache: torch.Tensor,  # [num_slots, layout.width] (``slot_rows``)
    block_size: int,
    layer_index: int,
    runtime: DareRuntime,
    layout: DareCacheLayout,
    scale: float,
    q: torch.Tensor,
    proj: DareProjections,
) -> torch.Tensor:
    """One layer's DARE attention on an explicit batch (its metadata and the
    layer's cache as slot rows); see ``dare_attention.dare_self_attention``."""
    T = meta.num_actual_tokens
    q = q[:T]
    step = runtime.step
    if step is not None and step.force.shape[0] != T:
        step = None  # not this batch's inputs (dummy run)
    if step is None or not step.any_reuse or not (runtime.kv_may_reuse
                                                  or runtime.o_may_reuse):
        # Nothing can be reused (every token forced or at tau 0: a refresh step, a
        # request's first forward): no predictor, every row.
        return _every_row(meta, cache, block_size, layer_index, runtime, layout, scale, q,
                          proj, step)
    return _selected_rows(meta, cache, block_size, layer_index, runtime, layout, scale, q,
                          proj, step)


def _every_row(meta, cache, block_size, layer_index, runtime, layout, scale, q, proj,
               step: DareStepInputs | None) -> torch.Tensor:
    """Nothing is reused: every row computed as in exact mode. Without step inputs
    (warm-up) every row the cache keeps is written; with them, what the batch's
    requests read later."""
    ops = runtime.ops
    T = q.shape[0]
    rows = runtime.all_rows if step is not None else torch.arange(T, device=q.device)
    slots = meta.slot_mapping
    keeps_reference = layout.has_qref if step is None else step.keeps_reference
    keeps_o = layout.has_o if step is None else step.keeps_o
    k, v = proj.project_kv(slice(0, T))
    ops.write_kv_rows(k, v, rows, slots, cache, layout)
    if keeps_reference:
        ops.write_rows(q, rows, slots, cache, layout.qref_offset, src_by_token=True)
    out = _attend_every_row(ops, meta, cache, block_size, layout, scale, q, rows, proj, (k, v))
    if keeps_o:
        ops.write_rows(out, rows, slots, cache, layout.o_offset)
    runtime.count(layer_index, meta)
    return out


def _attend_every_row(ops, meta, cache, block_size, layout, scale, q, rows, proj,
                      kv: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Attention and output projection of every row, in token order (the batch's
    ``query_start_loc`` says where each request's rows start). ``kv``: every token's
    keys and values of this step, when it computed them all; if, besides, every
    request's query is its whole sequence (``meta.full_sequence_len``), they are the
    whole context, and attention runs on them as dense tensors, as exact mode does,
    instead of gathering them back from the paged cache."""
    T = q.shape[0]
    q = q.view(T, layout.num_heads, layout.head_dim)
    if kv is not None and meta.full_sequence_len is not None and not meta.causal:
        attn = ops.dense_attention(q, kv[0], kv[1], layout, meta.full_sequence_len, scale)
    else:
        attn = torch.empty_like(q)
        ops.paged_attention_rows(q, cache, layout, meta.block_table, meta.seq_lens, rows,
                                 meta.token_req, attn, block_size, scale,
                                 max_rows_per_req=meta.max_query_len,
                                 req_row_start=meta.query_start_loc)
    return proj.project_o(attn.reshape(T, layout.q_width))


def _selected_rows(meta, cache, block_size, layer_index, runtime, layout, scale, q, proj,
                   step: DareStepInputs) -> torch.Tensor:
    """The predictor decides; only the recomputed rows are projected, attended and
    written. No host sync: the row lists and their lengths stay on the device
    (``select_rows``), and every kernel after it is launched over all T rows with
    the programs past the count returning at once, so the host queues the whole
    forward ahead of the GPU. A list no request of the batch can reuse (mode
    ``kv``: every O row) is known on the host to hold every row and runs as in
    exact mode."""
    ops = runtime.ops
    T = q.shape[0]
    slots = meta.slot_mapping
    # The layer's output: where O may be reused, the cached O rows of the tokens
    # that reuse it are copied in by ``decide_reuse``, the rest computed below.
    out = (torch.empty(T, layout.q_width, dtype=q.dtype, device=q.device)
           if runtime.o_may_reuse else None)
    # [T, 4] bool: K/V reused, O reused, K/V recomputed, O recomputed. The same
    # launch rewrites Q_ref of the tokens whose K/V (or O, as their request's Q_ref
    # follows) are recomputed, when a request of the batch keeps Q_ref; adds the
    # reuse flags to the tokens' counters; and fills ``out``'s reused rows.
    scratch = runtime.selection_scratch(T, meta.query_start_loc.shape[0] - 1)
    flags = ops.decide_reuse(q, slots, cache, layout, runtime.tau_kv, runtime.tau_o,
                             runtime.per_head,
                             step.kv_is_reference if step.keeps_reference else None,
                             reuse_counts=runtime.token_reuse_counts(T), o_out=out,
                             scratch=scratch)
    # Lists 0 (K/V recomputed) and 1 (O recomputed). The lengths stay on the
    # device; the kernel also adds them to the step's per-layer counters.
    lists, starts, counts = ops.select_rows(flags, meta.query_start_loc,
                                            runtime.recomputed_totals(layer_index, T), scratch)

    def count(which: int) -> torch.Tensor:
        return counts[which : which + 1]

    if runtime.kv_may_reuse and proj.kv_weight is not None:
        # Keys (RoPE applied) and values of the recomputed rows, into their slots.
        rope = proj.cos_sin_cache is not None
        ops.project_rows(proj.x, proj.kv_weight, proj.kv_bias, lists[0], count(0),
                         layout.head_dim, cache, layout.k_offset, slot_mapping=slots,
                         out_at_slot=True, positions=proj.positions,
                         cos_sin_cache=proj.cos_sin_cache,
                         rope_heads=layout.num_kv_heads if rope else 0)
    elif runtime.kv_may_reuse:
        kv_rows = lists[0][: int(count(0))]  # host sync (no plain weights: CPU)
        if kv_rows.numel():
            k, v = proj.project_kv(kv_rows)
            ops.write_kv_rows(k, v, kv_rows, slots, cache, layout)
    else:
        k, v = proj.project_kv(slice(0, T))
        ops.write_kv_rows(k, v, runtime.all_rows, slots, cache, layout)

    if runtime.o_may_reuse:
        # The recomputed rows attended, projected and stored into ``out`` (which
        # holds the reused rows already) and into their O slots.
        H, D = layout.num_heads, layout.head_dim
        attn = runtime.attention_rows((T, H, D), q.dtype)
        ops.paged_attention_rows(q.view(T, H, D), cache, layout, meta.block_table,
                                 meta.seq_lens, lists[1], None, attn, block_size, scale,
                                 max_rows_per_req=meta.max_query_len,
                                 req_row_start=starts[1])
        if proj.o_weight is not None:
            ops.project_rows(attn.view(T, layout.q_width), proj.o_weight, None, lists[1],
                             count(1), D, out, slot_mapping=slots,
                             out2=cache if step.keeps_o else None,
                             out2_col=layout.o_offset if step.keeps_o else 0)
        else:
            o_rows = lists[1][: int(count(1))]  # host sync (no plain weights: CPU)
            if o_rows.numel():
                projected = proj.project_o(attn.view(T, layout.q_width).index_select(0, o_rows))
                out.index_copy_(0, o_rows, projected)
                if step.keeps_o:
                    ops.write_rows(projected, o_rows, slots, cache, layout.o_offset)
    else:
        # (K/V may be reused here, so attention reads the cache.)
        out = _attend_every_row(ops, meta, cache, block_size, layout, scale, q,
                                runtime.all_rows, proj)
        if step.keeps_o:
            ops.write_rows(out, runtime.all_rows, slots, cache, layout.o_offset)
    runtime.count(layer_index, meta)
    return out
