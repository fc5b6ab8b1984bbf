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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_metadata import DareMetadata, slot_rows
from vllm_dare.attention_backends.dare_ops import dare_ops


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
        # [layers, 3]: tokens, K/V rows reused, O rows reused (this step). Host
        # ints: a layer knows its row counts anyway (it sizes its matmuls).
        self.layer_counts = np.zeros((num_layers, 3), dtype=np.int64)
        self.all_rows: torch.Tensor | None = None
        self._token_reused: torch.Tensor | None = None  # int32 [T, 2], over layers
        self._token_req: torch.Tensor | None = None
        self._layers_run = 0

    def begin_step(self, step: DareStepInputs | None, num_reqs: int) -> None:
        self.step = step
        self.num_reqs = num_reqs
        self.layer_counts[:] = 0
        self._token_reused = None
        self._token_req = None
        self._layers_run = 0
        # Row ids 0..T-1 of the step's tokens, shared by its layers.
        self.all_rows = (None if step is None
                         else torch.arange(step.force.shape[0], device=self.device))
        if step is not None and step.any_reuse:
            # The thresholds the predictor compares with: -1 (never passes) for
            # tokens that may not reuse at all (forced, or tau 0).
            never = torch.full_like(step.tau_kv, -1.0)
            self.tau_kv = torch.where(~step.force & (step.tau_kv > 0), step.tau_kv, never)
            self.tau_o = torch.where(~step.force & (step.tau_o > 0), step.tau_o, never)
            # Whose recomputes Q_ref follows, batch-wide when it can be (one host
            # sync per step, none per layer).
            self.reference = ("kv" if bool(step.kv_is_reference.all())
                              else "o" if not bool(step.kv_is_reference.any()) else "mixed")

    def count(self, layer_index: int, meta: DareMetadata, reused_kv: int, reused_o: int,
              reused_rows: torch.Tensor | None) -> None:
        """Record a layer's reuse: row counts, and ``reused_rows`` ([T, 2] bool: K/V
        reused, O reused; None when nothing was) per token."""
        T = meta.num_actual_tokens
        self.layer_counts[layer_index] += (T, reused_kv, reused_o)
        self._layers_run += 1
        if self._token_req is None:
            self._token_req = meta.token_req
        if reused_rows is not None:
            if self._token_reused is None:
                self._token_reused = torch.zeros(T, 2, dtype=torch.int32, device=self.device)
            self._token_reused.add_(reused_rows)

    @property
    def request_counts(self) -> torch.Tensor:
        """[num_reqs, 3] per request of the batch, summed over the layers run this
        step: token-layer rows, K/V rows reused, O rows reused."""
        reused = torch.zeros(self.num_reqs, 2, dtype=torch.int64, device=self.device)
        if self._token_req is None or not self.num_reqs:
            tokens = torch.zeros(self.num_reqs, 1, dtype=torch.int64, device=self.device)
        else:
            token_req = self._token_req.long()
            tokens = torch.bincount(token_req, minlength=self.num_reqs)
            tokens = (tokens[: self.num_reqs] * self._layers_run).view(-1, 1)
            if self._token_reused is not None:
                reused.index_add_(0, token_req, self._token_reused.long())
        return torch.cat([tokens, reused], dim=1)


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


def dare_attention_step(
    meta: DareMetadata,
    cache: torch.Tensor,  # [num_slots, layout.width] (``slot_rows``)
    block_size: int,
    layer_index: int,
    runtime: DareRuntime,
    layout: DareCacheLayout,
    scale: float,
    q: torch.Tensor,
    project_kv: ProjectKV,
    project_o: ProjectO,
) -> torch.Tensor:
    """One layer's DARE attention on an explicit batch (its metadata and the
    layer's cache as slot rows); see ``dare_attention.dare_self_attention``."""
    ops = runtime.ops
    T = meta.num_actual_tokens
    q = q[:T]
    step = runtime.step
    if step is not None and step.force.shape[0] != T:
        step = None  # not this batch's inputs (dummy run)

    all_rows = runtime.all_rows if step is not None else torch.arange(T, device=q.device)
    reused_rows = None
    if step is None or not step.any_reuse:
        kv_rows = o_rows = ref_rows = all_rows  # nothing to select
    else:
        # [T, 4] bool: K/V reused, O reused, K/V recomputed, O recomputed.
        flags = ops.decide_reuse(q, meta.slot_mapping, cache, layout, runtime.tau_kv,
                                 runtime.tau_o, runtime.per_head)
        reused_rows = flags[:, :2]
        # Every row list is taken here, back to back: each takes a host sync, and
        # only the first waits for real GPU work (query projection and predictor).
        kv_rows = flags[:, 2].nonzero().view(-1)
        o_rows = flags[:, 3].nonzero().view(-1)
        if runtime.reference == "kv":
            ref_rows = kv_rows
        elif runtime.reference == "o":
            ref_rows = o_rows
        else:
            ref_rows = torch.where(step.kv_is_reference, flags[:, 2], flags[:, 3])
            ref_rows = ref_rows.nonzero().view(-1)

    # Without step inputs (warm-up) every row the cache keeps is written; with them,
    # what the batch's requests read later (a request reusing rows this cache does
    # not keep is refused at admission, so asking for them here raises).
    keeps_reference = layout.has_qref if step is None else step.keeps_reference
    keeps_o = layout.has_o if step is None else step.keeps_o
    slots = meta.slot_mapping

    # K/V projection of the recomputed rows only (all of them: the input as it is).
    if kv_rows.numel():
        k, v = project_kv(slice(0, T) if kv_rows.numel() == T else kv_rows)
        ops.write_kv_rows(k, v, kv_rows, slots, cache, layout)
    if keeps_reference and ref_rows.numel():
        ops.write_rows(q, ref_rows, slots, cache, layout.qref_offset, src_by_token=True)

    # Attention and output projection of the recomputed rows only; the reused
    # rows' projected outputs come from the cache.
    R = o_rows.numel()
    attn = torch.empty(R, layout.num_heads, layout.head_dim, dtype=q.dtype, device=q.device)
    if R == T:
        # Every row, in token order: the batch's query_start_loc says where each
        # request's rows start.
        ops.paged_attention_rows(q.view(T, layout.num_heads, layout.head_dim), cache,
                                 layout, meta.block_table, meta.seq_lens, all_rows,
                                 meta.token_req, attn, block_size, scale,
                                 max_rows_per_req=meta.max_query_len,
                                 req_row_start=meta.query_start_loc)
    elif R:
        # The kernel writes row i of its output at position row_token[i]; here
        # the recomputed rows are packed, so position i of ``attn``.
        ops.paged_attention_rows(q[o_rows].view(R, layout.num_heads, layout.head_dim),
                                 cache, layout, meta.block_table, meta.seq_lens,
                                 all_rows[:R], meta.token_req[o_rows], attn, block_size,
                                 scale, max_rows_per_req=meta.max_query_len)
    projected = project_o(attn.view(R, layout.q_width)) if R else None
    if R == T:
        out = projected
    else:
        # Every row's cached output (one gather, no list of the reused rows), then
        # the recomputed rows overwritten.
        o_cols = cache[:, layout.o_offset : layout.o_offset + layout.q_width]
        out = o_cols.index_select(0, slots)
        if R:
            out.index_copy_(0, o_rows, projected)
    if keeps_o and R:
        ops.write_rows(projected, o_rows, slots, cache, layout.o_offset)

    runtime.count(layer_index, meta, T - kv_rows.numel(), T - R, reused_rows)
    return out
