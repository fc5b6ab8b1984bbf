"""Per-request denoising state machines: the official LLaDA and Dream steps.

A denoiser holds one request's canvas (its generated region, ``max_tokens``
positions, initially all [MASK]) and, given the logits of the canvas positions
its next step may unmask (``logit_positions``), performs exactly one step of the
reference algorithm (LLaDA's ``generate``, Dream's ``diffusion_generate``;
``vllm_dare/reference/generation.py`` is the plain version). Steps that provably
change nothing
(a LLaDA step that transfers 0 tokens, a Dream step whose transfer count
truncates to 0) are skipped without a forward pass; the output is unchanged.
"""

from __future__ import annotations

import torch

from vllm_dare.model_executor.denoising.params import DREAM, LLADA, DenoisingParams


class Denoiser:
    def __init__(self, params: DenoisingParams, mask_token_id: int, device: torch.device,
                 prompt_len: int = 0):
        self.params = params
        self.mask_token_id = mask_token_id
        self.gen_length = params.gen_length
        # The request's prompt length: LLaDA's random draws cover the whole
        # sequence (prompt + canvas), as the official code draws them.
        self.prompt_len = prompt_len
        self.canvas = torch.full(
            (params.gen_length,), mask_token_id, dtype=torch.long, device=device
        )
        self.generator = (
            None if params.seed is None
            else torch.Generator(device=device).manual_seed(params.seed)
        )
        self.next_step = 0
        self.steps_run = 0  # steps that ran a forward (skipped no-op steps excluded)
        # Per canvas position, the score the last step ranked it by when choosing
        # what to unmask (-inf: not eligible then); None before the first step and
        # for algorithms that do not rank (Dream's ``origin``).
        self.last_confidence: torch.Tensor | None = None

    def step(self, logits: torch.Tensor, positions: torch.Tensor | None = None) -> bool:
        """Apply one step given the logits ``[n, vocab]`` of canvas ``positions``
        (int64 [n], ascending; None: the whole canvas). The positions must include
        every one ``logit_positions()`` names. True when done."""
        self.steps_run += 1
        if positions is None:
            positions = torch.arange(self.gen_length, device=logits.device)
        return self._step(logits, positions)

    def _step(self, logits: torch.Tensor, positions: torch.Tensor) -> bool:
        raise NotImplementedError

    def at_block_start(self) -> bool:
        """True when the next step is the first of a (semi-autoregressive) block."""
        return self.next_step == 0

    def block_range(self) -> tuple[int, int]:
        """Canvas range ``[start, end)`` of the next step's block (the whole canvas
        for algorithms without blocks)."""
        return 0, self.gen_length

    def step_in_block(self) -> int:
        return self.next_step

    def known_next_positions(self):
        """The canvas positions the next step will unmask (numpy, most confident
        first) when the algorithm knows them before the forward, else None."""
        return None

    def logit_positions(self) -> torch.Tensor:
        """int64, ascending: the canvas positions whose logits the next step reads
        (those it may unmask)."""
        return self.eligible().nonzero().squeeze(-1)

    def eligible(self) -> torch.Tensor:
        """bool [gen_length]: the canvas positions the next step may unmask (every
        masked position unless a block limits them)."""
        return self.canvas == self.mask_token_id

    def candidates(self, limit: int = 0) -> torch.Tensor:
        """bool [gen_length]: the positions whose logits decide the next step. All
        eligible positions, or with ``limit`` > 0 only the ``limit`` of them the last
        step ranked highest (those without a score from it rank last; ties go to the
        lower position)."""
        eligible = self.eligible()
        if limit <= 0 or self.last_confidence is None or int(eligible.sum()) <= limit:
            return eligible
        score = torch.where(eligible, self.last_confidence.double(), float("-inf"))
        order = torch.sort(score, descending=True, stable=True).indices
        ranked = eligible[order].nonzero().squeeze(-1)[:limit]
        chosen = torch.zeros_like(eligible)
        chosen[order[ranked]] = True
        return chosen


def llada_transfer_counts(block_length: int, steps_per_block: int) -> list[int]:
    """Tokens unmasked at each step of a block: M // S each, the first M % S one more."""
    base, extra = divmod(block_length, steps_per_block)
    return [base + (1 if j < extra else 0) for j in range(steps_per_block)]


class LLaDADenoiser(Denoiser):
    """Semi-autoregressive block denoising with low-confidence / random remasking."""

    def __init__(self, params: DenoisingParams, mask_token_id: int, device: torch.device,
                 prompt_len: int = 0):
        super().__init__(params, mask_token_id, device, prompt_len)
        self.counts = llada_transfer_counts(params.block_length, params.steps_per_block)

    def _count(self, step: int) -> int:
        return self.counts[step % self.params.steps_per_block]

    def at_block_start(self) -> bool:
        return self.next_step % self.params.steps_per_block == 0

    def block_range(self) -> tuple[int, int]:
        block = self.next_step // self.params.steps_per_block
        return block * self.params.block_length, (block + 1) * self.params.block_length

    def step_in_block(self) -> int:
        return self.next_step % self.params.steps_per_block

    def eligible(self) -> torch.Tensor:
        p = self.params
        block = self.next_step // p.steps_per_block
        masked = self.canvas == self.mask_token_id
        masked[: block * p.block_length] = False
        masked[(block + 1) * p.block_length :] = False
        return masked

    def _step(self, logits: torch.Tensor, positions: torch.Tensor) -> bool:
        p = self.params
        block = self.next_step // p.steps_per_block
        k = self._count(self.next_step)
        tokens, confidence = self._choices(logits, positions, block)
        if k > 0:
            chosen = torch.topk(confidence, k).indices
            self.canvas[chosen] = tokens[chosen]
        self.next_step += 1
        while self.next_step < p.steps and self._count(self.next_step) == 0:
            self.next_step += 1
        return self.next_step >= p.steps

    def _row_tokens(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The token of each logits row: argmax, or with a temperature Gumbel-max in
        float64, argmax(exp(l) / (-log u) ** T). The noise is drawn for the whole
        sequence, prompt and canvas, as the official code draws it, so a seed gives
        the same tokens whatever rows have logits."""
        if self.params.temperature == 0:
            return logits.argmax(dim=-1)
        l64 = logits.double()
        u = self._sequence_uniform(l64.shape[-1], torch.float64)[positions]
        return (l64.exp() / (-torch.log(u)) ** self.params.temperature).argmax(dim=-1)

    def _sequence_uniform(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Uniform draws of one step for the canvas rows of a ``[prompt_len +
        gen_length, width]`` draw over the whole sequence (``width`` 0: a vector).
        The prompt rows are drawn in chunks and dropped; on the CPU that is the
        same stream as one draw."""
        shape = (width,) if width else ()
        chunk = max(1, (1 << 22) // max(width, 1))
        for start in range(0, self.prompt_len, chunk):
            rows = min(chunk, self.prompt_len - start)
            torch.rand((rows, *shape), dtype=dtype, device=self.canvas.device,
                       generator=self.generator)
        return torch.rand((self.gen_length, *shape), dtype=dtype, device=self.canvas.device,
                          generator=self.generator)

    def _choices(self, logits: torch.Tensor, positions: torch.Tensor,
                 block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaDA's candidate token of every canvas position (the canvas where no
        row was given) and its confidence (float64; -inf outside the block's
        masked positions); records the confidence in ``last_confidence``."""
        p = self.params
        masked = self.canvas == self.mask_token_id
        row_tokens = self._row_tokens(logits, positions)
        tokens = self.canvas.clone()
        tokens[positions] = row_tokens
        if p.remasking == "low_confidence":
            probs = torch.softmax(logits.double(), dim=-1)
            confidence = torch.full((self.gen_length,), float("-inf"), dtype=torch.float64,
                                    device=logits.device)
            confidence[positions] = probs.gather(-1, row_tokens[:, None]).squeeze(-1)
        else:
            # Official LLaDA: float32 uniform noise over the whole sequence.
            confidence = self._sequence_uniform(0, torch.float32).double()
        confidence[(block + 1) * p.block_length :] = float("-inf")
        confidence = torch.where(masked, confidence, float("-inf"))
        self.last_confidence = confidence
        return tokens, confidence


class LLaDAKnownOrderDenoiser(LLaDADenoiser):
    """LLaDA's random remasking with the order drawn once per block (the
    variant dKV-Cache Greedy decodes with): at each block start the block's
    positions get one random number each (float64, the request's generator) and
    each step unmasks the next ones in descending order, as many as the block's
    schedule says. The next step's positions are known before its forward, so
    only their logits are computed."""

    def __init__(self, params: DenoisingParams, mask_token_id: int, device: torch.device,
                 prompt_len: int = 0):
        super().__init__(params, mask_token_id, device, prompt_len)
        self.order: torch.Tensor | None = None  # the current block's, canvas positions
        self.order_block = -1
        self.taken = 0

    def _block_order(self) -> torch.Tensor:
        block = self.next_step // self.params.steps_per_block
        if block != self.order_block:
            start, end = self.block_range()
            draws = torch.rand(end - start, dtype=torch.float64, device=self.canvas.device,
                               generator=self.generator)
            self.order = start + torch.sort(draws, descending=True).indices
            self.order_block = block
            self.taken = 0
        return self.order

    def _next(self) -> torch.Tensor:
        k = self._count(self.next_step)
        return self._block_order()[self.taken:self.taken + k]

    def known_next_positions(self):
        return self._next().cpu().numpy()

    def eligible(self) -> torch.Tensor:
        eligible = torch.zeros_like(self.canvas, dtype=torch.bool)
        eligible[self._next()] = True
        return eligible

    def _step(self, logits: torch.Tensor, positions: torch.Tensor) -> bool:
        p = self.params
        chosen = self._next()
        row_tokens = self._row_tokens(logits, positions)
        self.canvas[chosen] = row_tokens[torch.searchsorted(positions, chosen)]
        self.taken += chosen.numel()
        self.next_step += 1
        while self.next_step < p.steps and self._count(self.next_step) == 0:
            self.next_step += 1
        return self.next_step >= p.steps


def accepted_count(confidence: torch.Tensor, rule: str, threshold: float,
                   factor: float) -> int:
    """How many of the ranked candidates ``confidence`` (descending) a
    parallel-decoding rule commits: the first always, then each next one while
    it passes (``threshold``: c_n >= threshold; ``factor``: c_n >= 1 - factor /
    (n + 1), n counted from 1)."""
    rest = confidence[1:]
    if rule == "threshold":
        passes = rest >= threshold
    else:
        n = torch.arange(2, confidence.numel() + 1, device=confidence.device,
                         dtype=torch.float64)
        passes = rest >= 1 - factor / (n + 1)
    return 1 + int(torch.cumprod(passes.to(torch.int64), 0).sum())


class BlockProgress:
    """Progress through the canvas block by block, for algorithms whose blocks take
    a data-dependent number of steps: the next block starts when the current one
    has no masked position left."""

    block = 0
    step_of_block = 0

    def at_block_start(self) -> bool:
        return self.step_of_block == 0

    def block_range(self) -> tuple[int, int]:
        length = self.params.block_length
        return self.block * length, (self.block + 1) * length

    def step_in_block(self) -> int:
        return self.step_of_block

    def _next_block_if_done(self, remaining: int) -> None:
        """After a step: ``remaining`` masked positions are left in the block."""
        if remaining == 0:
            self.block += 1
            self.step_of_block = 0


class LLaDAParallelDenoiser(BlockProgress, LLaDADenoiser):
    """LLaDA's blocks with Fast-dLLM's parallel decoding: each step commits the
    block's most confident masked position and the next most confident ones the
    rule accepts (``dllm_parallel``: ``threshold`` / ``factor``); a block takes
    as many steps as it needs, and the next block starts when it is done."""

    def eligible(self) -> torch.Tensor:
        start, end = self.block_range()
        masked = self.canvas == self.mask_token_id
        masked[:start] = False
        masked[end:] = False
        return masked

    def _step(self, logits: torch.Tensor, positions: torch.Tensor) -> bool:
        p = self.params
        tokens, confidence = self._choices(logits, positions, self.block)
        start, end = self.block_range()
        num_masked = int((self.canvas[start:end] == self.mask_token_id).sum())
        ranked = torch.topk(confidence, num_masked)
        k = accepted_count(ranked.values, p.parallel, p.threshold, p.factor)
        chosen = ranked.indices[:k]
        self.canvas[chosen] = tokens[chosen]
        self.next_step += 1
        self.step_of_block += 1
        self._next_block_if_done(num_masked - k)
        return self.block >= p.num_blocks


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    drop_sorted = cum > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


class DreamDenoiser(Denoiser):
    """Dream's ``diffusion_generate``: origin / maskgit_plus / topk_margin / entropy."""

    def __init__(self, params: DenoisingParams, mask_token_id: int, device: torch.device,
                 prompt_len: int = 0):
        super().__init__(params, mask_token_id, device, prompt_len)
        self.timesteps = torch.linspace(1, params.eps, params.steps + 1)
        self._skip_empty_steps(params.gen_length)  # the first step may unmask nothing

    def _num_transfer(self, step: int, num_masked: int) -> int:
        if step == self.params.steps - 1:
            return num_masked
        t, s = self.timesteps[step], self.timesteps[step + 1]
        return int(torch.tensor(float(num_masked)) * (1 - s / t))

    def _sample(self, logits: torch.Tensor,
                alg: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, token) per row, after temperature, top-p and top-k; the
        confidence of ``alg`` (default: the request's)."""
        p = self.params
        alg = alg or p.alg
        logits = logits.float()
        if p.temperature > 0:
            logits = logits / p.temperature
        if p.top_p is not None and p.top_p < 1:
            logits = _filter_top_p(logits, p.top_p)
        if p.top_k is not None:
            logits = _filter_top_k(logits, p.top_k)
        probs = torch.softmax(logits, dim=-1)
        if p.temperature > 0:
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
        else:
            confidence, tokens = probs.max(dim=-1)
        if alg == "topk_margin":
            top2 = torch.topk(probs, 2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
        return confidence, tokens

    def _step(self, logits: torch.Tensor, rows: torch.Tensor) -> bool:
        p = self.params
        i = self.next_step
        masked = self.canvas == self.mask_token_id
        positions = masked.nonzero().squeeze(-1)
        num_masked = positions.numel()
        # The rows of the masked positions (every masked one has a row).
        masked_logits = logits[torch.searchsorted(rows, positions)]
        if p.alg == "origin":
            if i < p.steps - 1:
                reveal_prob = float(1 - self.timesteps[i + 1] / self.timesteps[i])
            else:
                reveal_prob = 1.0
            reveal = torch.rand(num_masked, device=logits.device,
                                generator=self.generator) < reveal_prob
            if bool(reveal.any()):
                _, tokens = self._sample(masked_logits[reveal])
                self.canvas[positions[reveal]] = tokens
        else:
            confidence, tokens = self._sample(masked_logits)
            self.last_confidence = torch.full(
                (self.gen_length,), float("-inf"), dtype=confidence.dtype,
                device=confidence.device,
            ).index_put_((positions,), confidence)
            k = self._num_transfer(i, num_masked)
            if k > 0:
                if p.alg_temp:
                    # Sampled over the whole sequence (weight 0 off the masked
                    # positions), as the official code samples.
                    P = self.prompt_len
                    weights = torch.full((P + self.gen_length,), float("-inf"),
                                         dtype=confidence.dtype, device=confidence.device)
                    weights[P + positions] = confidence / p.alg_temp
                    picked = torch.multinomial(torch.softmax(weights, dim=-1), k,
                                               replacement=False, generator=self.generator)
                    chosen = torch.searchsorted(positions, picked - P)
                else:
                    chosen = torch.topk(confidence, k).indices
                self.canvas[positions[chosen]] = tokens[chosen]
        self.next_step += 1
        remaining = int((self.canvas == self.mask_token_id).sum())
        if remaining == 0:
            return True
        self._skip_empty_steps(remaining)
        return self.next_step >= p.steps

    def _skip_empty_steps(self, remaining: int) -> None:
        """Move past the steps whose transfer count truncates to 0 (they unmask
        nothing; ``origin`` has no count)."""
        if self.params.alg == "origin":
            return
        while (self.next_step < self.params.steps - 1
               and self._num_transfer(self.next_step, remaining) == 0):
            self.next_step += 1


class DreamBlockDenoiser(BlockProgress, DreamDenoiser):
    """Fast-dLLM's block-wise Dream generation (``dllm_block_length`` set for a
    Dream request). Per block of the canvas, ``steps / num_blocks`` steps:

    * step 0 decodes the block's first position only (its token from the
      position's logits, read from the hidden row before it);
    * steps 1 .. S-1 rank the block's masked positions by negative entropy and
      commit Dream's schedule count, ``int(masked * (1 - s / t))`` with ``t, s``
      the block's timesteps ``linspace(1, eps, S + 1)[j], [j + 1]``, and every
      remaining one at the last step; with ``dllm_parallel`` the most confident
      (softmax probability of the token) and the next ones the rule accepts,
      until the block is done.
    """

    def __init__(self, params: DenoisingParams, mask_token_id: int, device: torch.device,
                 prompt_len: int = 0):
        Denoiser.__init__(self, params, mask_token_id, device, prompt_len)
        self.steps_per_block = params.steps // params.num_blocks
        self.timesteps = torch.linspace(1, params.eps, self.steps_per_block + 1)

    def eligible(self) -> torch.Tensor:
        start, end = self.block_range()
        eligible = torch.zeros_like(self.canvas, dtype=torch.bool)
        if self.step_of_block == 0:
            eligible[start] = True
        else:
            eligible[start:end] = self.canvas[start:end] == self.mask_token_id
        return eligible

    def _block_count(self, j: int, num_masked: int) -> int:
        if j == self.steps_per_block - 1:
            return num_masked
        t, s = self.timesteps[j], self.timesteps[j + 1]
        return int(torch.tensor(float(num_masked)) * (1 - s / t))

    def _step(self, logits: torch.Tensor, rows: torch.Tensor) -> bool:
        p = self.params
        start, end = self.block_range()
        if self.step_of_block == 0:
            _, tokens = self._sample(logits[torch.searchsorted(rows, torch.tensor(
                [start], device=rows.device))])
            self.canvas[start] = tokens[0]
        else:
            positions = start + (self.canvas[start:end] == self.mask_token_id
                                 ).nonzero().squeeze(-1)
            block_logits = logits[torch.searchsorted(rows, positions)]
            confidence, tokens = self._sample(block_logits, alg="entropy")
            if p.parallel == "none":
                k = self._block_count(self.step_of_block, positions.numel())
                ranked = torch.topk(confidence, k).indices
            else:
                # The probability of each token (float64 softmax), ranked.
                probs = torch.softmax(block_logits.double(), dim=-1)
                confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
                order = torch.topk(confidence, positions.numel())
                k = accepted_count(order.values, p.parallel, p.threshold, p.factor)
                ranked = order.indices[:k]
            self.last_confidence = torch.full(
                (self.gen_length,), float("-inf"), dtype=confidence.dtype,
                device=confidence.device).index_put_((positions,), confidence)
            self.canvas[positions[ranked]] = tokens[ranked]
        self.next_step += 1
        self.step_of_block += 1
        remaining = int((self.canvas[start:end] == self.mask_token_id).sum())
        if p.parallel == "none":
            # Steps whose count truncates to 0 unmask nothing: no forward.
            while (remaining and self.step_of_block < self.steps_per_block - 1
                   and self._block_count(self.step_of_block, remaining) == 0):
                self.step_of_block += 1
        self._next_block_if_done(remaining)
        return self.block >= p.num_blocks


def make_denoiser(
    params: DenoisingParams, mask_token_id: int, device: torch.device, prompt_len: int = 0
) -> Denoiser:
    args = (params, mask_token_id, device, prompt_len)
    if params.family == LLADA:
        if params.parallel != "none":
            return LLaDAParallelDenoiser(*args)
        if params.cache == "dkv_greedy":
            return LLaDAKnownOrderDenoiser(*args)
        return LLaDADenoiser(*args)
    if params.family == DREAM:
        if params.block_length:
            return DreamBlockDenoiser(*args)
        return DreamDenoiser(*args)
    raise ValueError(f"unknown model family {params.family!r}")
