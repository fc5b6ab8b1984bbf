"""Dream (Dream-org/Dream-v0-*-7B) for vLLM.

Dream is Qwen2.5 run with bidirectional attention over the whole sequence; the
checkpoint uses the Qwen2 layout, so the backbone is vLLM's ``Qwen2Model``.
Inherited from its autoregressive initialisation, Dream reads the distribution of
position i from the hidden state at i-1 (``logits_position_offset = -1``, applied
by ``DenoisingModelState`` when it picks the canvas rows).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from vllm_dare.model_executor.models.denoising_lm import DenoisingLM


class DreamModel(DenoisingLM):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    hf_to_vllm_mapper = Qwen2Model.hf_to_vllm_mapper
    logits_position_offset = -1

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.tie_word_embeddings:
            raise ValueError("Dream checkpoints have an untied lm_head")
        self.config = config
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self._init_lm_head(vllm_config, config.vocab_size, config.hidden_size, prefix)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
