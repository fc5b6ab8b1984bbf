"""Per-request denoising knobs: defaults, parsing and validation.

A request's knobs come from ``SamplingParams.extra_args`` (keys ``dllm_*``), falling
back to the served model's defaults (its ``generation_config.json`` plus
``--override-generation-config``). ``max_tokens`` is the generation length: the
number of [MASK] positions appended to the prompt.

The same resolution runs at admission in the API process (to reject bad requests
with a clear message) and in the worker (to configure the request's denoiser).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

LLADA = "llada"
DREAM = "dream"

LLADA_REMASKING = ("low_confidence", "random")

# Classifier-free guidance runs an unconditional twin of the request (its prompt
# replaced by [MASK]) next to it. The twin's request id is the owner's plus this
# suffix, and its extra_args name the owner under CFG_TWIN_OWNER_KEY.
CFG_TWIN_SUFFIX = "::dllm-cfg-uncond"
CFG_TWIN_OWNER_KEY = "_dllm_cfg_owner"
DREAM_ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")
# Fast-dLLM parallel decoding rules (``dllm_parallel``).
PARALLEL_RULES = ("none", "threshold", "factor")
DEFAULT_THRESHOLD = 0.9
DEFAULT_FACTOR = 1.0

# Request knobs (SamplingParams.extra_args) and the model family they apply to.
REQUEST_KEYS: dict[str, tuple[str, ...]] = {
    "dllm_steps": (LLADA, DREAM),
    "dllm_block_length": (LLADA, DREAM),
    "dllm_remasking": (LLADA,),
    "dllm_cfg_scale": (LLADA,),
    "dllm_temperature": (LLADA, DREAM),
    "dllm_alg": (DREAM,),
    "dllm_alg_temp": (DREAM,),
    "dllm_top_p": (DREAM,),
    "dllm_top_k": (DREAM,),
    "dllm_seed": (LLADA, DREAM),
    # Cache policy (``vllm_dare.cache_policies``) and its parameters.
    "dllm_cache": (LLADA, DREAM),
    "dllm_cache_refresh": (LLADA, DREAM),
    "dllm_cache_window": (LLADA, DREAM),
    # Parallel decoding (Fast-dLLM): how many tokens a step may commit.
    "dllm_parallel": (LLADA, DREAM),
    "dllm_threshold": (LLADA, DREAM),
    "dllm_factor": (LLADA, DREAM),
}
# Engine defaults of the cache knobs (``--additional-config``).
CACHE_KEYS = ("dllm_cache", "dllm_cache_refresh", "dllm_cache_window")
# Engine defaults of the parallel-decoding knobs (``--additional-config``).
PARALLEL_KEYS = ("dllm_parallel", "dllm_threshold", "dllm_factor")
# Every engine default ``--additional-config`` sets by a request knob's name.
ENGINE_KNOB_KEYS = CACHE_KEYS + PARALLEL_KEYS

# generation_config.json keys read as served defaults, per family.
GENERATION_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    LLADA: ("steps", "block_length", "remasking", "cfg_scale", "temperature"),
    DREAM: ("steps", "alg", "alg_temp", "eps", "temperature", "top_p", "top_k"),
}


@dataclass(frozen=True)
class DenoisingDefaults:
    """What the served model does for a request that sets no ``dllm_*`` knob.

    ``steps`` / ``block_length`` of None mean "equal to max_tokens" (one token per
    step, one block), the official LLaDA defaults with gen_length = steps =
    block_length.
    """

    family: str
    mask_token_id: int
    canvas_length: int
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    alg: str = "origin"
    alg_temp: float | None = None
    eps: float = 1e-3
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    # Engine DARE settings (a DareSettings dict) when served with the DARE backend.
    dare: dict | None = None
    # Engine cache policy and its parameters (``dllm_cache*`` in --additional-config).
    cache: str = "none"
    cache_refresh: int | None = None
    cache_window: int | None = None
    # Engine parallel decoding (``dllm_parallel`` etc. in --additional-config).
    parallel: str = "none"
    threshold: float | None = None
    factor: float | None = None

    @classmethod
    def from_generation_config(
        cls,
        family: str,
        mask_token_id: int,
        canvas_length: int,
        generation_config: dict[str, Any],
        dare: dict | None = None,
        engine_knobs: dict | None = None,
    ) -> DenoisingDefaults:
        """``engine_knobs``: request knobs set as engine defaults
        (``ENGINE_KNOB_KEYS`` of ``--additional-config``)."""
        values = {
            key: generation_config[key]
            for key in GENERATION_CONFIG_KEYS[family]
            if generation_config.get(key) is not None
        }
        defaults = cls(
            family=family,
            mask_token_id=mask_token_id,
            canvas_length=canvas_length,
            dare=dare,
            **{key.removeprefix("dllm_"): value
               for key, value in (engine_knobs or {}).items()},
            **values,
        )
        defaults.check()
        return defaults

    def check(self) -> None:
        """Reject served defaults that no request could use."""
        probe = {}
        if self.steps is not None:
            probe["dllm_steps"] = self.steps
        if self.family == LLADA:
            if self.block_length is not None:
                probe["dllm_block_length"] = self.block_length
            probe["dllm_remasking"] = self.remasking
            probe["dllm_cfg_scale"] = self.cfg_scale
        else:
            probe["dllm_alg"] = self.alg
            probe["dllm_alg_temp"] = self.alg_temp
            probe["dllm_top_p"] = self.top_p
            probe["dllm_top_k"] = self.top_k
            if not (0.0 < self.eps < 1.0):
                raise ValueError(f"generation config eps must be in (0, 1), got {self.eps}")
        probe["dllm_temperature"] = self.temperature
        probe["dllm_cache"] = self.cache
        if self.cache_refresh is not None:
            probe["dllm_cache_refresh"] = self.cache_refresh
        if self.cache_window is not None:
            probe["dllm_cache_window"] = self.cache_window
        probe["dllm_parallel"] = self.parallel
        if self.threshold is not None:
            probe["dllm_threshold"] = self.threshold
        if self.factor is not None:
            probe["dllm_factor"] = self.factor
        _parse_knobs(probe, self.family)
        _check_parallel(self.family, self.parallel, self.threshold, self.factor, None,
                        blocks=self.family == LLADA)
        from vllm_dare.cache_policies import check_choice

        check_choice(self.cache, self.family, self.cache_refresh, self.cache_window)

    # The frontend validator is named after its defaults so that every process
    # (API server, engine core) can rebuild it from the name alone.
    def encode(self) -> str:
        raw = json.dumps(asdict(self), sort_keys=True).encode()
        return base64.b32encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> DenoisingDefaults:
        padded = token + "=" * (-len(token) % 8)
        return cls(**json.loads(base64.b32decode(padded)))


@dataclass(frozen=True)
class DenoisingParams:
    """Fully resolved knobs of one request."""

    family: str
    gen_length: int
    steps: int
    temperature: float
    # LLaDA; for Dream, set only for Fast-dLLM's block-wise generation
    block_length: int = 0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    # Dream
    alg: str = "origin"
    alg_temp: float | None = None
    eps: float = 1e-3
    top_p: float | None = None
    top_k: int | None = None
    # Seed of the request's own random generator (temperature > 0, random
    # remasking, Dream's origin / alg_temp); None uses the engine's generator.
    seed: int | None = None
    # Cache policy (``vllm_dare.cache_policies``): name and parameters.
    cache: str = "none"
    cache_refresh: int | None = None
    cache_window: int | None = None
    # Parallel decoding (Fast-dLLM): ``none`` commits the official schedule's
    # count per step; ``threshold`` / ``factor`` commit, per step, the most
    # confident masked position of the block and the next ones the rule accepts,
    # until the block is done (``steps`` is then not used).
    parallel: str = "none"
    threshold: float = DEFAULT_THRESHOLD
    factor: float = DEFAULT_FACTOR

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length if self.block_length else 1

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _parse_knobs(extra: dict[str, Any], family: str) -> dict[str, Any]:
    """Type- and range-check the ``dllm_*`` keys present in ``extra``."""
    knobs: dict[str, Any] = {}
    for key, value in extra.items():
        if not key.startswith("dllm_"):
            continue
        if key not in REQUEST_KEYS:
            raise ValueError(
                f"unknown diffusion knob {key!r}; known: {', '.join(sorted(REQUEST_KEYS))}"
            )
        if family not in REQUEST_KEYS[key]:
            model = "LLaDA" if family == LLADA else "Dream"
            raise ValueError(f"{key} does not apply to {model} models")
        knobs[key] = value

    def positive_int(key: str) -> None:
        if key in knobs and not (_is_int(knobs[key]) and knobs[key] > 0):
            raise ValueError(f"{key} must be a positive integer, got {knobs[key]!r}")

    def non_negative(key: str, allow_none: bool = False) -> None:
        if key not in knobs or (allow_none and knobs[key] is None):
            return
        if not (_is_number(knobs[key]) and knobs[key] >= 0):
            raise ValueError(f"{key} must be a number >= 0, got {knobs[key]!r}")

    positive_int("dllm_steps")
    positive_int("dllm_block_length")
    positive_int("dllm_cache_refresh")
    positive_int("dllm_cache_window")
    if "dllm_cache" in knobs and not isinstance(knobs["dllm_cache"], str):
        raise ValueError(f"dllm_cache must be a string, got {knobs['dllm_cache']!r}")
    if "dllm_parallel" in knobs and knobs["dllm_parallel"] not in PARALLEL_RULES:
        raise ValueError(f"dllm_parallel must be one of {', '.join(PARALLEL_RULES)}, "
                         f"got {knobs['dllm_parallel']!r}")
    threshold = knobs.get("dllm_threshold")
    if threshold is not None and not (_is_number(threshold) and 0 < threshold <= 1):
        raise ValueError(f"dllm_threshold must be a number in (0, 1], got {threshold!r}")
    factor = knobs.get("dllm_factor")
    if factor is not None and not (_is_number(factor) and factor > 0):
        raise ValueError(f"dllm_factor must be a number > 0, got {factor!r}")
    non_negative("dllm_temperature")
    non_negative("dllm_cfg_scale")
    non_negative("dllm_alg_temp", allow_none=True)
    if "dllm_remasking" in knobs and knobs["dllm_remasking"] not in LLADA_REMASKING:
        raise ValueError(
            f"dllm_remasking must be one of {', '.join(LLADA_REMASKING)}, "
            f"got {knobs['dllm_remasking']!r}"
        )
    if "dllm_alg" in knobs and knobs["dllm_alg"] not in DREAM_ALGORITHMS:
        raise ValueError(
            f"dllm_alg must be one of {', '.join(DREAM_ALGORITHMS)}, "
            f"got {knobs['dllm_alg']!r}"
        )
    top_p = knobs.get("dllm_top_p")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"dllm_top_p must be in (0, 1], got {top_p!r}")
    seed = knobs.get("dllm_seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise ValueError(f"dllm_seed must be an integer in [0, 2**63), got {seed!r}")
    top_k = knobs.get("dllm_top_k")
    if top_k is not None and not (_is_int(top_k) and top_k > 0):
        raise ValueError(f"dllm_top_k must be a positive integer, got {top_k!r}")
    return knobs


def _check_parallel(family: str, rule: str, threshold, factor, steps,
                    blocks: bool) -> None:
    """A parallel-decoding choice that can run: its parameter only with its rule,
    no step count (steps are data-dependent), blocks (``blocks``: LLaDA, or
    Dream's block-wise generation)."""
    if threshold is not None and rule != "threshold":
        raise ValueError(f"dllm_threshold applies to dllm_parallel='threshold' only "
                         f"(dllm_parallel is {rule!r})")
    if factor is not None and rule != "factor":
        raise ValueError(f"dllm_factor applies to dllm_parallel='factor' only "
                         f"(dllm_parallel is {rule!r})")
    if rule == "none":
        return
    if family == DREAM and not blocks:
        raise ValueError(
            "dllm_parallel for Dream needs dllm_block_length: Fast-dLLM decodes Dream "
            "in parallel within its block-wise Dream generation")
    if steps is not None:
        raise ValueError(f"dllm_steps does not apply with dllm_parallel={rule!r}: a "
                         "step commits as many tokens as the rule accepts, until the "
                         "block is done")


def _with_parallel(knobs: dict[str, Any], defaults: DenoisingDefaults,
                   params: DenoisingParams) -> DenoisingParams:
    """``params`` with the request's parallel-decoding rule, checked."""
    rule = knobs.get("dllm_parallel", defaults.parallel)
    if "dllm_parallel" in knobs and rule != defaults.parallel:
        threshold, factor = None, None  # another rule: not the default's parameter
    else:
        threshold, factor = defaults.threshold, defaults.factor
    threshold = knobs.get("dllm_threshold", threshold)
    factor = knobs.get("dllm_factor", factor)
    _check_parallel(params.family, rule, threshold, factor, knobs.get("dllm_steps"),
                    blocks=bool(params.block_length))
    if rule == "none":
        return params
    return replace(
        params,
        parallel=rule,
        steps=params.gen_length,  # at most one token per step: the bound on forwards
        threshold=float(DEFAULT_THRESHOLD if threshold is None else threshold),
        factor=float(DEFAULT_FACTOR if factor is None else factor),
    )


def resolve_params(
    extra_args: dict[str, Any] | None,
    max_tokens: int | None,
    defaults: DenoisingDefaults,
) -> DenoisingParams:
    """Resolve and validate one request's knobs; ValueError explains what is wrong."""
    family = defaults.family
    knobs = _parse_knobs(dict(extra_args or {}), family)
    if max_tokens is None:
        raise ValueError(
            "max_tokens must be set for diffusion models: it is the generation "
            "length (the number of masked positions denoised)"
        )
    if max_tokens > defaults.canvas_length:
        raise ValueError(
            f"max_tokens={max_tokens} exceeds the served canvas of "
            f"{defaults.canvas_length} tokens (raise it with --diffusion-config "
            "'{\"canvas_length\": N}')"
        )
    gen_length = max_tokens
    steps = knobs.get("dllm_steps", defaults.steps or gen_length)
    if knobs.get("dllm_parallel", defaults.parallel) != "none" and "dllm_steps" not in knobs:
        steps = gen_length  # not used by the rule; keeps the block checks below
    temperature = float(knobs.get("dllm_temperature", defaults.temperature))

    if family == LLADA:
        block_length = knobs.get("dllm_block_length", defaults.block_length or gen_length)
        if gen_length % block_length != 0:
            raise ValueError(
                f"max_tokens={gen_length} must be a multiple of the block length "
                f"{block_length} (dllm_block_length); note that the OpenAI server "
                "caps max_tokens at max_model_len - prompt length"
            )
        num_blocks = gen_length // block_length
        if steps % num_blocks != 0:
            raise ValueError(
                f"dllm_steps={steps} must be divisible by the number of blocks "
                f"{num_blocks} (max_tokens / block length)"
            )
        cfg_scale = float(knobs.get("dllm_cfg_scale", defaults.cfg_scale))
        return _with_cache(knobs, defaults, _with_parallel(knobs, defaults, DenoisingParams(
            family=LLADA,
            gen_length=gen_length,
            steps=steps,
            temperature=temperature,
            block_length=block_length,
            remasking=knobs.get("dllm_remasking", defaults.remasking),
            cfg_scale=cfg_scale,
            seed=knobs.get("dllm_seed"),
        )))

    alg_temp = knobs.get("dllm_alg_temp", defaults.alg_temp)
    block_length = knobs.get("dllm_block_length", 0)
    if block_length:
        _check_dream_blocks(knobs, gen_length, steps, block_length,
                            knobs.get("dllm_parallel", defaults.parallel))
    return _with_cache(knobs, defaults, _with_parallel(knobs, defaults, DenoisingParams(
        family=DREAM,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        temperature=temperature,
        alg=knobs.get("dllm_alg", defaults.alg),
        alg_temp=None if alg_temp is None else float(alg_temp),
        eps=defaults.eps,
        top_p=knobs.get("dllm_top_p", defaults.top_p),
        top_k=knobs.get("dllm_top_k", defaults.top_k),
        seed=knobs.get("dllm_seed"),
    )))


def _check_dream_blocks(knobs: dict[str, Any], gen_length: int, steps: int,
                       block_length: int, parallel: str) -> None:
    """Fast-dLLM's block-wise Dream generation: whole blocks, the same steps in
    each, at least two (the first decodes only the block's first token), and its
    own ranking (negative entropy), so no ``dllm_alg``."""
    if gen_length % block_length != 0:
        raise ValueError(
            f"max_tokens={gen_length} must be a multiple of the block length "
            f"{block_length} (dllm_block_length); note that the OpenAI server "
            "caps max_tokens at max_model_len - prompt length")
    for key in ("dllm_alg", "dllm_alg_temp"):
        if key in knobs:
            raise ValueError(
                f"{key} does not apply with dllm_block_length: Fast-dLLM's block-wise "
                "Dream generation ranks a block's positions by negative entropy")
    if parallel != "none":
        return
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0 or steps // num_blocks < 2:
        raise ValueError(
            f"dllm_steps={steps} must be a multiple of the number of blocks "
            f"{num_blocks} (max_tokens / dllm_block_length) with at least 2 steps per "
            "block (the first decodes only the block's first token)")


def _with_cache(knobs: dict[str, Any], defaults: DenoisingDefaults,
                params: DenoisingParams) -> DenoisingParams:
    """``params`` with the request's cache policy, checked by the policy."""
    from vllm_dare.cache_policies import check_params

    name = knobs.get("dllm_cache", defaults.cache)
    if "dllm_cache" in knobs and name != defaults.cache:
        # A request that picks another policy does not inherit the engine
        # default's parameters.
        refresh, window = None, None
    else:
        refresh, window = defaults.cache_refresh, defaults.cache_window
    params = replace(
        params,
        cache=name,
        cache_refresh=knobs.get("dllm_cache_refresh", refresh),
        cache_window=knobs.get("dllm_cache_window", window),
    )
    check_params(params)
    return params
