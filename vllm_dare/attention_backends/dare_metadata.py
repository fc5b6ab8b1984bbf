"""What a DARE attention layer gets for one forward: the batch's paging metadata
(built by ``dare_backend.DareMetadataBuilder`` from vLLM's common metadata) and a
view of the layer's cache as one row per token slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout


@dataclass
class DareMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    token_req: torch.Tensor  # int32 [num_tokens]: request of each token
    causal: bool
    max_query_len: int  # tokens of the longest request in this batch (host int)
    # L when every request's query is its whole sequence and all are L tokens long (a
    # diffusion step over whole canvases, no cached prefix): the step's own keys and
    # values are then every request's entire context, and a step that recomputes
    # every row attends on them directly (``dense_attention``) instead of through
    # the paged cache. None otherwise.
    full_sequence_len: int | None = None


def full_sequence_len(query_lens: torch.Tensor, num_tokens: int, max_seq_len: int) -> int | None:
    """``DareMetadata.full_sequence_len`` from host-side batch facts: the common
    length L when every request's query (``query_lens``, CPU) is L tokens and its
    whole sequence (the sequences are no longer: ``max_seq_len``, an upper bound of
    their lengths, is L), with no padding tokens after them (``num_tokens``)."""
    if query_lens.numel() == 0:
        return None
    L = int(query_lens[0])
    if max_seq_len != L or num_tokens != L * query_lens.numel():
        return None
    return L if bool((query_lens == L).all()) else None


def slot_rows(kv_cache: torch.Tensor, layout: DareCacheLayout, dtype: torch.dtype) -> torch.Tensor:
    """View a layer's cache as ``[num_slots, layout.width]`` rows of ``dtype``.

    vLLM hands the layer a logical ``[num_blocks, num_kv_heads, block_size, C]`` view
    whose physical order is token-major (LBNHC/BLNHC), so each token slot is one
    contiguous run of ``num_kv_heads * C`` bytes.
    """
    t = kv_cache.permute(0, 2, 1, 3)  # [B, N, H, C]
    num_blocks, block_size = t.shape[0], t.shape[1]
    if t.dtype != dtype:
        t = t.view(torch.uint8) if t.dtype != torch.uint8 else t
        t = t.view(dtype)
    rows = t.reshape(num_blocks * block_size, -1)
    assert rows.shape[1] == layout.width, (rows.shape, layout.width)
    return rows
