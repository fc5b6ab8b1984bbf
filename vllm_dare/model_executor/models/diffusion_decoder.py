"""The pre-norm decoder LLaDA and Dream share: bidirectional self-attention
(``DiffusionSelfAttention``) and a SwiGLU MLP, each after an RMSNorm.

Module names follow vLLM's Qwen2/Llama (``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp.gate_up_proj``, ``mlp.down_proj``); each model
maps its checkpoint's tensor names onto them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.qwen2 import Qwen2MLP

from vllm_dare.attention_backends.dare_layer_step import DareRuntime
from vllm_dare.model_executor.models.diffusion_attention import DiffusionSelfAttention


class DiffusionDecoderLayer(nn.Module):
    def __init__(
        self,
        self_attn: DiffusionSelfAttention,
        hidden_size: int,
        intermediate_size: int,
        rms_norm_eps: float,
        quant_config=None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.mlp = Qwen2MLP(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            hidden_act="silu",
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def decoder_layer_factory(
    vllm_config: VllmConfig,
    *,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    rms_norm_eps: float,
    rope_parameters: dict,
    max_position: int,
    qkv_bias: bool,
    rope_full_precision: bool,
) -> Callable[[int, DareRuntime | None, str], DiffusionDecoderLayer]:
    """``make_layer`` for ``DiffusionBackbone`` from a model's dimensions."""

    def make_layer(index: int, dare_runtime: DareRuntime | None, prefix: str):
        attn = DiffusionSelfAttention(
            hidden_size=hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            rope_parameters=rope_parameters,
            max_position=max_position,
            qkv_bias=qkv_bias,
            rope_full_precision=rope_full_precision,
            layer_index=index,
            dare_runtime=dare_runtime,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
        )
        return DiffusionDecoderLayer(
            attn, hidden_size, intermediate_size, rms_norm_eps,
            vllm_config.quant_config, prefix=prefix,
        )

    return make_layer


class DiffusionBackbone(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(
        self,
        *,
        vllm_config: VllmConfig,
        prefix: str,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        rms_norm_eps: float,
        make_layer: Callable[[int, DareRuntime | None, str], nn.Module],
    ) -> None:
        super().__init__()
        from vllm_dare.model_executor.models.denoising_lm import make_dare_runtime

        self.embed_tokens = VocabParallelEmbedding(
            vocab_size, hidden_size, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.dare_runtime = make_dare_runtime(vllm_config, num_layers)
        self.layers = nn.ModuleList(
            make_layer(i, self.dare_runtime, f"{prefix}.layers.{i}") for i in range(num_layers)
        )
        self.norm = RMSNorm(hidden_size, eps=rms_norm_eps)

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
