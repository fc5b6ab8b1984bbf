"""The interface every cache policy implements, and what it returns per forward.

A cache policy decides, for one request and one forward, which positions of the
request's sequence (prompt + canvas) the forward *feeds* through the model, and
how far the fed tokens' attention reaches (``attend``: keys at positions
``0 .. attend - 1``). Positions that are not fed keep the K/V their last forward
wrote into vLLM's paged KV cache and are read from there; they get no embedding,
no projection, no attention row, no MLP and no LM-head row. Logits are computed
only for the canvas positions the request's denoiser may unmask in this forward.

Exact mode is the policy that feeds every position and attends to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class ForwardPlan:
    """One request's part of one forward.

    ``fed``: sorted positions (0-based, within prompt + canvas) the forward feeds;
    None means all of them. ``attend``: the fed tokens attend to the keys at
    positions ``0 .. attend - 1`` (fed tokens' own keys included); None means the
    whole sequence.
    """

    fed: np.ndarray | None = None
    attend: int | None = None

    def check(self, length: int) -> None:
        """Raise ValueError unless the plan fits a sequence of ``length`` positions:
        fed positions ascending, distinct and inside it, each within the reach of
        the attention (a fed token attends to its own key)."""
        if self.attend is not None and not 0 < self.attend <= length:
            raise ValueError(f"attention reach {self.attend} outside 1..{length}")
        if self.fed is None:
            return
        fed = self.fed
        if fed.size == 0:
            raise ValueError("a forward that feeds nothing")
        if fed[0] < 0 or fed[-1] >= length or (fed.size > 1 and (np.diff(fed) <= 0).any()):
            raise ValueError(f"fed positions must be ascending and distinct within "
                             f"0..{length - 1}, got {fed[0]}..{fed[-1]}")
        if self.attend is not None and fed[-1] >= self.attend:
            raise ValueError(f"fed position {fed[-1]} beyond the attention reach "
                             f"{self.attend}")

    @staticmethod
    def span(start: int, end: int, attend: int | None = None) -> ForwardPlan:
        return ForwardPlan(np.arange(start, end, dtype=np.int64), attend)


FEED_ALL = ForwardPlan()


@dataclass(frozen=True)
class DenoisingView:
    """What a policy may read about its request before a forward.

    It describes the request's denoising state (for a guidance twin, its owner's:
    the twin's logits steer the owner's step). ``block`` is the
    ``(start, end)`` canvas range the next step may unmask (the whole canvas for
    algorithms without blocks); ``block_start`` is True when that step is the
    first of its block, ``step_in_block`` counts the block's steps before it
    (skipped steps that unmask nothing included). ``masked`` (read on first use)
    says which canvas positions still hold [MASK]. ``next_unmasked``: the canvas
    positions the next step will unmask, most confident first, where the
    denoiser knows them in advance (an order drawn at the block start), else None.
    """

    prompt_len: int
    gen_length: int
    block: tuple[int, int]
    block_start: bool
    step_in_block: int
    canvas: torch.Tensor = field(repr=False)
    mask_token_id: int
    next_unmasked: np.ndarray | None = None

    @cached_property
    def masked(self) -> np.ndarray:
        return (self.canvas == self.mask_token_id).cpu().numpy()


class CachePolicy:
    """One method. Subclasses set ``name`` (the ``dllm_cache`` value) and
    ``families``, validate a request's parameters in ``check`` and return a
    ``ForwardPlan`` per forward from ``plan``. ``params`` is the request's
    resolved ``model_executor.denoising.params.DenoisingParams`` (the params module
    checks requests with the policies, so this module does not import it). One instance per request (it may
    keep per-request state between forwards); ``plan`` is called once per
    denoising forward, in order."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]] = ("llada", "dream")
    # Whether the policy reads dllm_cache_refresh / dllm_cache_window.
    uses_refresh: ClassVar[bool] = False
    uses_window: ClassVar[bool] = False
    # Dream's generations the policy applies to: "official" (Dream's own
    # algorithms) and/or "blockwise" (Fast-dLLM's block-wise Dream generation,
    # dllm_block_length set).
    dream_generations: ClassVar[tuple[str, ...]] = ("official",)

    def __init__(self, params: Any):
        self.params = params

    @classmethod
    def check(cls, params: Any) -> None:
        """Raise ValueError when the request cannot use this policy."""

    def plan(self, view: DenoisingView) -> ForwardPlan:
        raise NotImplementedError
