"""Dream (Dream-org/Dream-v0-*-7B) for vLLM.

Dream is Qwen2.5 run with bidirectional attention over the whole sequence; the
checkpoint uses the Qwen2 layout (q/k/v with bias, gate/up/down MLP), fused at load
time. Inherited from its autoregressive initialisation, Dream reads the
distribution of position i from the hidden state at i-1 (``logits_position_offset =
-1``, applied by ``DenoisingModelState`` when it picks the canvas rows).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from vllm_dare.attention_backends.dare_attention import DareRuntime
from vllm_dare.configs import DreamConfig
from vllm_dare.model_executor.models.denoising_lm import DenoisingLM, make_dare_runtime
from vllm_dare.model_executor.models.diffusion_attention import DiffusionSelfAttention


class DreamDecoderLayer(nn.Module):
    def __init__(
        self,
        config: DreamConfig,
        layer_index: int,
        dare_runtime: DareRuntime | None = None,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.self_attn = DiffusionSelfAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            rope_parameters=config.rope_parameters,
            max_position=config.max_position_embeddings,
            qkv_bias=True,
            rope_full_precision=False,
            layer_index=layer_index,
            dare_runtime=dare_runtime,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = Qwen2MLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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


class DreamBackbone(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: DreamConfig = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.dare_runtime = make_dare_runtime(vllm_config, config.num_hidden_layers)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(
                config, i, self.dare_runtime, cache_config, quant_config,
                prefix=f"{prefix}.layers.{i}",
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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


class DreamModel(DenoisingLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )
    logits_position_offset = -1

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.tie_word_embeddings:
            raise ValueError("Dream checkpoints have an untied lm_head")
        self.config = config
        self.model = DreamBackbone(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self._init_lm_head(vllm_config, config.vocab_size, config.hidden_size, prefix)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    # With the DARE backend q is its own layer and k/v are fused (kv_proj).
    dare_weights_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".k_proj": (".kv_proj", 0),
            ".v_proj": (".kv_proj", 1),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapper = (
            self.hf_to_vllm_mapper if self.dare_runtime is None else self.dare_weights_mapper
        )
        return AutoWeightsLoader(self).load_weights(weights, mapper=mapper)
