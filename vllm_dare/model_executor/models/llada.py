"""LLaDA (GSAI-ML/LLaDA-8B-*) for vLLM.

A Llama-shaped pre-norm decoder run with bidirectional attention over the whole
sequence (prompt and canvas). Checkpoint layout ``model.transformer.*`` with
separate q/k/v and gate (``ff_proj``) / up projections, fused at load time.
RoPE is applied in fp32 (``rope_full_precision``), like the reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix

from vllm_dare.configs import LLaDAConfig
from vllm_dare.attention_backends.dare_attention import DareRuntime
from vllm_dare.model_executor.models.denoising_lm import DenoisingLM, make_dare_runtime
from vllm_dare.model_executor.models.diffusion_attention import DiffusionSelfAttention


class LLaDAMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        # Checkpoint: ff_proj is the gate (SiLU applied), up_proj the up projection.
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.ff_out = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.ff_out",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.ff_out(self.act_fn(gate_up))
        return x


class LLaDABlock(nn.Module):
    def __init__(
        self,
        config: LLaDAConfig,
        layer_index: int,
        dare_runtime: DareRuntime | None = None,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.self_attn = DiffusionSelfAttention(
            hidden_size=config.d_model,
            num_heads=config.n_heads,
            num_kv_heads=config.n_kv_heads,
            rope_parameters=config.rope_parameters,
            max_position=config.max_sequence_length,
            qkv_bias=False,
            rope_full_precision=bool(config.rope_full_precision),
            layer_index=layer_index,
            dare_runtime=dare_runtime,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.ff_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.mlp = LLaDAMLP(
            config.d_model, config.mlp_hidden_size, quant_config, prefix=f"{prefix}.mlp"
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.attn_norm(hidden_states)
        else:
            hidden_states, residual = self.attn_norm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.ff_norm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LLaDAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: LLaDAConfig = vllm_config.model_config.hf_config
        config.validate_architecture()
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.embedding_size,
            config.d_model,
            quant_config=quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.dare_runtime = make_dare_runtime(vllm_config, config.n_layers)
        self.layers = nn.ModuleList(
            LLaDABlock(
                config, i, self.dare_runtime, cache_config, quant_config,
                prefix=f"{prefix}.layers.{i}",
            )
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = (
            inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        )
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# Checkpoint name (inside model.transformer.blocks.N.) -> (our name, shard id).
_BLOCK_WEIGHTS: dict[str, tuple[str, str | int | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q"),
    "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"),
    "attn_out": ("self_attn.o_proj", None),
    "attn_norm": ("attn_norm", None),
    "ff_norm": ("ff_norm", None),
    "ff_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "ff_out": ("mlp.ff_out", None),
}
_TOP_WEIGHTS = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}


# With the DARE backend q is its own layer and k/v are fused (kv_proj).
_DARE_BLOCK_WEIGHTS = {
    **_BLOCK_WEIGHTS,
    "q_proj": ("self_attn.q_proj", None),
    "k_proj": ("self_attn.kv_proj", 0),
    "v_proj": ("self_attn.kv_proj", 1),
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
        self.config = config
        self.model = LLaDAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self._init_lm_head(vllm_config, config.embedding_size, config.d_model, prefix)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

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
