"""LLaDA (GSAI-ML/LLaDA-8B-*) for vLLM.

A Llama-shaped pre-norm decoder run with bidirectional attention over the whole
sequence (prompt and canvas). Checkpoint layout ``model.transformer.*`` with
separate q/k/v and gate (``ff_proj``) / up projections, fused at load time.
RoPE is applied in fp32 (``rope_full_precision``), like the reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix

from vllm_dare.configs import LLaDAConfig
from vllm_dare.model_executor.models.denoising_lm import DenoisingLM
from vllm_dare.model_executor.models.diffusion_decoder import (
    DiffusionBackbone,
    decoder_layer_factory,
)

# Checkpoint name (inside model.transformer.blocks.N.) -> (our name, shard id).
_BLOCK_WEIGHTS: dict[str, tuple[str, str | int | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q"),
    "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"),
    "attn_out": ("self_attn.o_proj", None),
    "attn_norm": ("input_layernorm", None),
    "ff_norm": ("post_attention_layernorm", None),
    "ff_proj": ("mlp.gate_up_proj", 0),  # the gate (SiLU applied to it)
    "up_proj": ("mlp.gate_up_proj", 1),
    "ff_out": ("mlp.down_proj", None),
}
# With the DARE backend q is its own layer and k/v are fused (kv_proj).
_DARE_BLOCK_WEIGHTS = {
    **_BLOCK_WEIGHTS,
    "q_proj": ("self_attn.q_proj", None),
    "k_proj": ("self_attn.kv_proj", 0),
    "v_proj": ("self_attn.kv_proj", 1),
}
_TOP_WEIGHTS = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}


def _checkpoint_to_param(name: str, dare: bool) -> tuple[str, str | int | None]:
    """Map an official LLaDA tensor name to (parameter name, shard id)."""
    if name in _TOP_WEIGHTS:
        return _TOP_WEIGHTS[name], None
    prefix = "model.transformer.blocks."
    table = _DARE_BLOCK_WEIGHTS if dare else _BLOCK_WEIGHTS
    if name.startswith(prefix):
        layer, module, suffix = name[len(prefix):].split(".", 2)
        if module in table:
            target, shard = table[module]
            return f"model.layers.{layer}.{target}.{suffix}", shard
    raise ValueError(f"unexpected tensor in LLaDA checkpoint: {name}")


class LLaDAModelLM(DenoisingLM):
    """LLaDA with its LM head; denoising runs through ``DenoisingModelState``."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["ff_proj", "up_proj"],
    }
    # LLaDA reads a position's logits from its own hidden state.
    logits_position_offset = 0

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: LLaDAConfig = vllm_config.model_config.hf_config
        config.validate_architecture()
        self.config = config

        make_layer = decoder_layer_factory(
            vllm_config,
            hidden_size=config.d_model,
            num_heads=config.n_heads,
            num_kv_heads=config.n_kv_heads,
            intermediate_size=config.mlp_hidden_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_parameters=config.rope_parameters,
            max_position=config.max_sequence_length,
            qkv_bias=False,
            rope_full_precision=bool(config.rope_full_precision),
        )

        self.model = DiffusionBackbone(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            vocab_size=config.embedding_size,
            hidden_size=config.d_model,
            num_layers=config.n_layers,
            rms_norm_eps=config.rms_norm_eps,
            make_layer=make_layer,
        )
        self._init_lm_head(vllm_config, config.embedding_size, config.d_model, prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        dare = self.dare_runtime is not None
        for checkpoint_name, tensor in weights:
            name, shard = _checkpoint_to_param(checkpoint_name, dare)
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        return loaded
