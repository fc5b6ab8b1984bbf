"""vllm-dare: serve diffusion language models (LLaDA, Dream) with vLLM.

``register`` is the ``vllm.general_plugins`` entry point; vLLM calls it in every
process (API server, engine core, workers). It is idempotent and cheap: model
classes are registered lazily by name.
"""

from __future__ import annotations

__version__ = "0.1.0"

ARCHITECTURES = {
    "LLaDAModelLM": "vllm_dare.model_executor.models.llada:LLaDAModelLM",
    "DreamModel": "vllm_dare.model_executor.models.dream:DreamModel",
}

_registered = False

DARE_BACKEND = "vllm_dare.attention_backends.dare_backend.DareAttentionBackend"


def _register_dare_backend_name() -> None:
    """Make ``--attention-backend dare`` parse (AttentionBackendEnum.DARE)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "DARE" not in AttentionBackendEnum.__members__:
        register_backend("DARE", DARE_BACKEND)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_dare.configs import DreamConfig, LLaDAConfig
    from vllm_dare.model_executor.engine_config import (
        DreamEngineConfig,
        LLaDAEngineConfig,
    )

    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    AutoConfig.register("Dream", DreamConfig, exist_ok=True)
    for arch, target in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
    MODELS_CONFIG_MAP["LLaDAModelLM"] = LLaDAEngineConfig
    MODELS_CONFIG_MAP["DreamModel"] = DreamEngineConfig
    _register_dare_backend_name()
    _registered = True
