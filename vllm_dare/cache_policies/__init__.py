"""Cache policies: per request, which tokens a forward feeds and what they attend to.

Each method is one module of this package defining one ``CachePolicy`` subclass;
the modules are found here by name, so adding a method edits nothing else. A
request picks its policy with the ``dllm_cache`` knob (engine default:
``--additional-config '{"dllm_cache": ...}'``); the worker turns the requests'
``ForwardPlan`` s into one batch-wide ``StepPlan`` (``step_plan.py``).

DARE works on top of any of them: per fed token and layer it decides whether the
token's K/V and attention output are reused (``dare_reuse.py``: settings,
forced-row rules, per-request counts; ``dare_counters.py``: engine-wide
counters). ``work_counters.py`` counts the token-layer rows the forwards computed.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from vllm_dare.cache_policies.base import (
    FEED_ALL,
    CachePolicy,
    DenoisingView,
    ForwardPlan,
)

_NOT_POLICIES = {"base", "step_plan", "work_counters", "dare_reuse", "dare_counters"}


@lru_cache(maxsize=1)
def policies() -> dict[str, type[CachePolicy]]:
    """``dllm_cache`` value -> policy class, for every module of this package."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_POLICIES:
            importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[CachePolicy]] = {}
    stack = list(CachePolicy.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "name" in cls.__dict__:
            if cls.name in found:
                raise RuntimeError(f"two cache policies named {cls.name!r}")
            found[cls.name] = cls
    return dict(sorted(found.items()))


def policy_class(name: str) -> type[CachePolicy]:
    classes = policies()
    if name not in classes:
        raise ValueError(f"dllm_cache must be one of {', '.join(classes)}, got {name!r}")
    return classes[name]


def check_choice(name: str, family: str, refresh: int | None, window: int | None) -> None:
    """Raise ValueError unless policy ``name`` applies to ``family`` and reads the
    parameters that are set."""
    cls = policy_class(name)
    if family not in cls.families:
        models = " and ".join("LLaDA" if f == "llada" else "Dream" for f in cls.families)
        raise ValueError(f"dllm_cache={name!r} applies to {models} models only")
    if refresh is not None and not cls.uses_refresh:
        raise ValueError(f"dllm_cache={name!r} has no dllm_cache_refresh parameter")
    if window is not None and not cls.uses_window:
        raise ValueError(f"dllm_cache={name!r} has no dllm_cache_window parameter")


def check_params(params) -> None:
    """Raise ValueError unless the request (resolved ``DenoisingParams``) can run
    its cache policy."""
    check_choice(params.cache, params.family, params.cache_refresh, params.cache_window)
    cls = policy_class(params.cache)
    if params.family == "dream":
        generation = "blockwise" if params.block_length else "official"
        if generation not in cls.dream_generations:
            raise ValueError(
                f"dllm_cache={params.cache!r} applies to Dream's "
                + ("block-wise generation (dllm_block_length set) only"
                   if generation == "official" else
                   "official generation only, not to the block-wise one "
                   "(dllm_block_length set)"))
    cls.check(params)


def make_policy(params) -> CachePolicy:
    return policy_class(params.cache)(params)


__all__ = ["FEED_ALL", "CachePolicy", "DenoisingView", "ForwardPlan", "check_choice",
           "check_params", "make_policy", "policies", "policy_class"]
