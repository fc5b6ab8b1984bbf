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

from vllm.config import VllmConfig
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from vllm_dare.configs import DreamConfig
from vllm_dare.model_executor.models.denoising_lm import DenoisingLM
from vllm_dare.model_executor.models.diffusion_decoder import (
    DiffusionBackbone,
    decoder_layer_factory,
)


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
    # With the DARE backend q is its own layer and k/v are fused (kv_proj).
    dare_weights_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".k_proj": (".kv_proj", 0),
            ".v_proj": (".kv_proj", 1),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )
    logits_position_offset = -1

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: DreamConfig = vllm_config.model_config.hf_config
        if config.tie_word_embeddings:
            raise ValueError("Dream checkpoints have an untied lm_head")
        self.config = config

        make_layer = decoder_layer_factory(
            vllm_config,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_parameters=config.rope_parameters,
            max_position=config.max_position_embeddings,
            qkv_bias=True,
            rope_full_precision=False,
        )

        self.model = DiffusionBackbone(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            rms_norm_eps=config.rms_norm_eps,
            make_layer=make_layer,
        )
        self._init_lm_head(vllm_config, config.vocab_size, config.hidden_size, prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapper = (
            self.hf_to_vllm_mapper if self.dare_runtime is None else self.dare_weights_mapper
        )
        return AutoWeightsLoader(self).load_weights(weights, mapper=mapper)
