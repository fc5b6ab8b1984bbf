"""One forward's plan for the whole batch, built from each request's
``ForwardPlan``: which of the scheduled tokens the model computes, how far their
attention reaches, and which hidden rows become logits.

vLLM schedules every denoising request's whole sequence (``T`` tokens for the
batch, request ``i`` at ``query_start[i] ..``); the step plan picks the fed ones
(``fed_tokens``, indices into those ``T``) and lays them out compactly, in the
same order. The model runs on the fed tokens only; the attention metadata
describes the compact batch (its query starts, slot mappings and positions) and
each request's ``attend`` length. A request's logits are read from the hidden
rows of its ``logit_positions`` (canvas positions; Dream reads position ``p``
from the row of ``p - 1``): those rows are always fed, whatever the policy says,
since a logit needs its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_dare.cache_policies.base import ForwardPlan


@dataclass
class RequestForward:
    """One request's part of the batch, as the worker sees it."""

    query_start: int  # first of its tokens in the batch
    query_len: int
    first_position: int  # sequence position of its first scheduled token
    prompt_len: int
    plan: ForwardPlan
    logit_positions: np.ndarray  # int64 canvas positions needing logits (may be empty)


@dataclass
class StepPlan:
    num_tokens: int  # scheduled tokens (T)
    # int64 [n] indices (into the T scheduled tokens) of the fed ones; None when
    # every scheduled token is fed.
    fed_tokens: np.ndarray | None
    query_start_loc: np.ndarray  # int32 [R + 1], compact
    fed_per_request: np.ndarray  # int64 [R]
    # int32 [R] attention lengths where some request attends to less than its
    # scheduled sequence; None otherwise.
    seq_lens: np.ndarray | None
    logits_indices: np.ndarray  # int64 [L]: compact hidden rows read as logits
    logit_start: np.ndarray  # int64 [R + 1]: request i's logits rows
    logit_positions: list[np.ndarray]  # per request, canvas position of each row
    _fed_index: torch.Tensor | None = None

    @property
    def num_fed(self) -> int:
        return int(self.query_start_loc[-1])

    def fed_index(self, device: torch.device) -> torch.Tensor | None:
        """``fed_tokens`` on ``device`` (copied once per plan)."""
        if self.fed_tokens is None:
            return None
        if self._fed_index is None:
            self._fed_index = torch.from_numpy(self.fed_tokens).to(device, non_blocking=True)
        return self._fed_index


def build_step_plan(requests: list[RequestForward], num_tokens: int,
                    logits_offset: int) -> StepPlan:
    """The batch's plan; ``logits_offset`` is the model's offset from a position
    to the hidden row its logits come from (0 LLaDA, -1 Dream)."""
    R = len(requests)
    fed_parts: list[np.ndarray] = []
    fed_per_request = np.zeros(R, dtype=np.int64)
    seq_lens = np.zeros(R, dtype=np.int32)
    attend_limited = False
    logits_indices: list[np.ndarray] = []
    logit_start = np.zeros(R + 1, dtype=np.int64)
    everything = True
    compact_start = 0
    for i, r in enumerate(requests):
        end = r.first_position + r.query_len  # sequence length after this forward
        rows = r.prompt_len + r.logit_positions + logits_offset  # sequence positions
        if r.plan.fed is None:
            fed = np.arange(r.first_position, end, dtype=np.int64)
        else:
            # A plan is checked against its sequence (``ForwardPlan.check``) before
            # it gets here; a denoising forward schedules the whole sequence.
            fed = np.union1d(r.plan.fed, rows).astype(np.int64)
            everything = everything and fed.size == r.query_len
        token_index = r.query_start + (fed - r.first_position)
        fed_parts.append(token_index)
        fed_per_request[i] = fed.size
        seq_lens[i] = end if r.plan.attend is None else min(r.plan.attend, end)
        attend_limited = attend_limited or seq_lens[i] != end
        # Hidden row of each logit position within the compact batch.
        where = np.searchsorted(fed, rows)
        logits_indices.append(compact_start + where)
        logit_start[i + 1] = logit_start[i] + rows.size
        compact_start += fed.size
    fed_tokens = np.concatenate(fed_parts) if fed_parts else np.zeros(0, np.int64)
    query_start_loc = np.zeros(R + 1, dtype=np.int32)
    np.cumsum(fed_per_request, out=query_start_loc[1:])
    all_fed = everything and fed_tokens.size == num_tokens
    return StepPlan(
        num_tokens=num_tokens,
        fed_tokens=None if all_fed else fed_tokens,
        query_start_loc=query_start_loc,
        fed_per_request=fed_per_request,
        seq_lens=seq_lens if attend_limited else None,
        logits_indices=(np.concatenate(logits_indices) if logits_indices
                        else np.zeros(0, np.int64)),
        logit_start=logit_start,
        logit_positions=[r.logit_positions for r in requests],
    )
