"""HF config classes registered with transformers' AutoConfig by the plugin."""

from vllm_dare.configs.dream import DreamConfig
from vllm_dare.configs.llada import LLaDAConfig

__all__ = ["DreamConfig", "LLaDAConfig"]
