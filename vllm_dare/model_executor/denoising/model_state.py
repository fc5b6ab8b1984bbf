"""Model Runner V2 ``ModelState`` for LLaDA and Dream.

Everything vLLM's default state does, plus what a masked diffusion model needs:

* bidirectional attention for every request (``causal=False``);
* the diffusion sampler (``custom_sampler``), with no token sampled on top of
  the canvas (``num_new_sampled_tokens_per_step = 0``);
* Dream's one-position logit shift: the canvas logits are read from the hidden
  states one position earlier (``logits_position_offset`` of the model class).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_dare.model_executor.denoising.params import DenoisingDefaults
from vllm_dare.model_executor.denoising.sampler import DenoisingSampler


class DenoisingModelState(DefaultModelState):
    supports_prompt_embeds = False
    num_new_sampled_tokens_per_step: int = 0

    def __init__(self, vllm_config, model, encoder_cache, device: torch.device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.defaults = DenoisingDefaults.decode(
            vllm_config.model_config.hf_config.denoising_defaults
        )
        self.logits_position_offset = getattr(model, "logits_position_offset", 0)
        self.sampler: DenoisingSampler | None = None
        self._slot_of: dict[str, int] = {}

    def get_supported_generation_tasks(self):
        return ("generate",)

    def custom_sampler(self, sampler: Any):
        self.sampler = DenoisingSampler(sampler, self.defaults, self.device)
        return self.sampler, None

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self._slot_of[new_req_data.req_id] = req_index
        if self.sampler is not None:
            self.sampler.req_id_of_slot[req_index] = new_req_data.req_id

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        slot = self._slot_of.pop(req_id, None)
        if slot is not None and self.sampler is not None:
            self.sampler.remove_request(slot)

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        if self.logits_position_offset and input_batch.num_draft_tokens > 0:
            # Every logits row is a canvas position and every query starts at
            # position 0 with a non-empty prompt, so row - 1 stays inside the
            # request: it is the hidden state Dream reads that position from.
            input_batch.logits_indices = (
                input_batch.logits_indices + self.logits_position_offset
            )
        return inputs

    def prepare_attn(
        self,
        input_batch,
        cudagraph_mode,
        block_tables,
        slot_mappings,
        attn_groups,
        kv_cache_config,
        for_capture: bool = False,
        ubatch_idx: int = 0,
        model_specific_attn_metadata=None,
    ) -> dict[str, Any]:
        num_reqs = input_batch.num_reqs
        num_tokens = input_batch.num_tokens
        query_start_loc_cpu = torch.from_numpy(
            input_batch.query_start_loc_np[: num_reqs + 1]
        )
        max_query_len = int(input_batch.num_scheduled_tokens.max())
        seq_lens_upper = input_batch.seq_lens_cpu_upper_bound
        max_seq_len = (
            self.max_model_len if for_capture else int(seq_lens_upper[:num_reqs].max())
        )
        return build_attn_metadata(
            attn_groups=attn_groups,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc_gpu=input_batch.query_start_loc[: num_reqs + 1],
            query_start_loc_cpu=query_start_loc_cpu,
            max_query_len=max_query_len,
            seq_lens=input_batch.seq_lens,
            max_seq_len=max_seq_len,
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            seq_lens_cpu_upper_bound=seq_lens_upper,
            positions=input_batch.positions,
            is_prefilling=torch.from_numpy(input_batch.is_prefilling_np),
            for_cudagraph_capture=for_capture,
            causal=False,
            ubatch_idx=ubatch_idx,
            req_idx=input_batch.idx_mapping_np,
        )
