"""What LLaDA and Dream share as vLLM models: the LM head, the logits, and the
``ModelState`` that runs denoising."""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.utils import maybe_prefix

from vllm_dare.attention_backends.dare_layer_step import DareRuntime
from vllm_dare import vllm_compat
from vllm_dare.vllm_compat import feed_slot_mappings
from vllm_dare.cache_policies.dare_reuse import DareSettings
from vllm_dare.model_executor.denoising.model_state import DenoisingModelState
from vllm_dare.model_executor.denoising.params import DenoisingDefaults


def make_dare_runtime(vllm_config: VllmConfig, num_layers: int) -> DareRuntime | None:
    """The shared DARE state of a model served with ``--attention-backend dare``."""
    raw = DenoisingDefaults.decode(vllm_compat.engine_settings(vllm_config)).dare
    if raw is None:
        return None
    settings = DareSettings(**raw)
    return DareRuntime(num_layers, settings.per_head, vllm_config.device_config.device,
                       max_mode=settings.max_mode)


class DenoisingLM(nn.Module):
    """Base of the two model classes; subclasses build ``self.model`` (a backbone
    with ``embed_input_ids``) and call ``_init_lm_head``."""

    # Offset from a position to the hidden state its logits are read from
    # (0 for LLaDA, -1 for Dream's shift); applied by DenoisingModelState.
    logits_position_offset = 0

    @staticmethod
    def get_model_state_cls():
        return DenoisingModelState

    def _init_lm_head(
        self, vllm_config: VllmConfig, vocab_size: int, hidden_size: int, prefix: str
    ) -> None:
        self.lm_head = ParallelLMHead(
            vocab_size,
            hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        self.logits_processor = LogitsProcessor(vocab_size)

    @property
    def dare_runtime(self) -> DareRuntime | None:
        return self.model.dare_runtime

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        fed_tokens: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``fed_tokens``: set when the step plan feeds part of the scheduled
        tokens; ``input_ids`` and ``positions`` are then already those tokens'."""
        if fed_tokens is not None:
            feed_slot_mappings(fed_tokens)
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)
