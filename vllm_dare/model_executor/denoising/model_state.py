"""Model Runner V2 ``ModelState`` for LLaDA and Dream.

Everything vLLM's default state does, plus what a masked diffusion model needs:

* bidirectional attention for every request (``causal=False``);
* the diffusion sampler (``custom_sampler``), with no token sampled on top of
  the canvas (``num_new_sampled_tokens_per_step = 0``);
* Dream's one-position logit shift: the canvas logits are read from the hidden
  states one position earlier (``logits_position_offset`` of the model class);
* the step plan (``cache_policies``): per request the tokens its cache policy
  feeds and the canvas positions that need logits; the model runs on the fed
  tokens only (``prepare_inputs``), with attention metadata for them
  (``prepare_attn``), and logits are read for those positions only;
* freed host memory handed back to the OS as requests finish (``heap_trim``);
* with the DARE backend, the step's per-token reuse inputs, narrowed to the fed
  tokens (the rules: ``cache_policies/dare_reuse.py``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vllm.distributed import get_tensor_model_parallel_rank
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_dare import vllm_compat
from vllm_dare.cache_policies import FEED_ALL, DenoisingView
from vllm_dare.cache_policies.step_plan import RequestForward, StepPlan, build_step_plan
from vllm_dare.heap_trim import HeapTrimmer
from vllm_dare.model_executor.denoising.params import DenoisingDefaults
from vllm_dare.model_executor.denoising.sampler import CfgTwin, DenoisingSampler


class DenoisingModelState(DefaultModelState):
    supports_prompt_embeds = False
    num_new_sampled_tokens_per_step: int = 0

    def __init__(self, vllm_config, model, encoder_cache, device: torch.device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.defaults = DenoisingDefaults.decode(vllm_compat.engine_settings(vllm_config))
        self.logits_position_offset = getattr(model, "logits_position_offset", 0)
        self.sampler: DenoisingSampler | None = None
        self._slot_of: dict[str, int] = {}
        self.dare_runtime = getattr(model, "dare_runtime", None)
        self.served_model_name = str(vllm_config.model_config.served_model_name)
        # With the multiprocess executor this worker is a child of the engine-core
        # process, whose scheduler reads finished requests' figures from there.
        self.stats_channel = (
            vllm_compat.stats_channel(os.getppid())
            if vllm_config.parallel_config.distributed_executor_backend == "mp"
            else None
        )
        self.heap_trimmer = HeapTrimmer()
        self.num_layers = len(model.model.layers)
        # The plan of the forward being prepared (None for dummy batches).
        self.step_plan: StepPlan | None = None

    def get_supported_generation_tasks(self):
        return ("generate",)

    def custom_sampler(self, sampler: Any):
        self.sampler = DenoisingSampler(sampler, self.defaults, self.device)
        self.sampler.dare_runtime = self.dare_runtime
        self.sampler.model_name = self.served_model_name
        self.sampler.publish_stats = get_tensor_model_parallel_rank() == 0
        self.sampler.stats_channel = self.stats_channel
        self.sampler.num_layers = self.num_layers
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
        self.heap_trimmer.requests_finished()

    def prepare_inputs(self, input_batch, req_states) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        plan = self.step_plan
        fed = None if plan is None else plan.fed_index(self.device)
        if self.dare_runtime is not None:
            dare = self._dare_step(input_batch)
            if dare is not None and fed is not None:
                dare = dare.select(fed)
            self.dare_runtime.begin_step(dare, input_batch.num_reqs)
        if plan is None:
            return inputs
        input_batch.logits_indices = torch.from_numpy(plan.logits_indices).to(
            self.device, non_blocking=True)
        if fed is not None:
            T = input_batch.num_tokens
            inputs["input_ids"] = input_batch.input_ids[:T][fed]
            inputs["positions"] = input_batch.positions[:T][fed]
            inputs["fed_tokens"] = fed
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        if self.dare_runtime is not None:
            self.dare_runtime.begin_step(None, 0)
        return super().prepare_dummy_inputs(num_reqs, num_tokens)

    def _dare_step(self, input_batch):
        """Per-token DARE inputs of this forward (None for dummy batches); the
        rules are DARE's (``cache_policies/dare_reuse.py``)."""
        if self.sampler is None:
            return None
        return self.sampler.dare.step_inputs(input_batch, self._deciding_denoiser,
                                             self.logits_position_offset)

    def _deciding_denoiser(self, slot: int):
        """The denoiser whose step a forward of ``slot`` serves: its own, or for a
        guidance twin its owner's (None for dummy slots)."""
        state = self.sampler.states.get(slot) if self.sampler is not None else None
        if isinstance(state, CfgTwin):
            owner_slot = self._slot_of.get(state.owner_req_id)
            return None if owner_slot is None else self.sampler.states.get(owner_slot)
        return state

    def _plan_step(self, input_batch) -> StepPlan | None:
        """The step plan of a real batch, from each request's cache policy."""
        if self.sampler is None:
            return None
        num_reqs = input_batch.num_reqs
        slots = input_batch.idx_mapping_np[:num_reqs]
        if not any(int(slot) in self.sampler.states for slot in slots):
            return None  # a dummy batch
        starts = input_batch.query_start_loc_np[: num_reqs + 1]
        num_logits = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
        no_logits = np.zeros(0, dtype=np.int64)
        requests = []
        for i in range(num_reqs):
            slot = int(input_batch.idx_mapping_np[i])
            prompt_len = int(input_batch.prefill_len_np[i])
            plan, positions = FEED_ALL, no_logits
            denoiser = self._deciding_denoiser(slot)
            policy = self.sampler.policies.get(slot)
            # A forward over the whole canvas (the sampler fails any other).
            if (denoiser is not None and policy is not None and num_logits[i] > 0
                    and num_logits[i] == denoiser.gen_length):
                try:
                    positions = denoiser.logit_positions().cpu().numpy()
                    plan = policy.plan(DenoisingView(
                        prompt_len=prompt_len,
                        gen_length=denoiser.gen_length,
                        block=denoiser.block_range(),
                        block_start=denoiser.at_block_start(),
                        step_in_block=denoiser.step_in_block(),
                        canvas=denoiser.canvas,
                        mask_token_id=denoiser.mask_token_id,
                        next_unmasked=denoiser.known_next_positions(),
                    ))
                    plan.check(prompt_len + denoiser.gen_length)
                except Exception as exc:  # this request fails, the batch goes on
                    self.sampler.plan_failures[slot] = exc
                    plan, positions = FEED_ALL, no_logits
            requests.append(RequestForward(
                query_start=int(starts[i]),
                query_len=int(starts[i + 1] - starts[i]),
                first_position=int(input_batch.num_computed_tokens_np[i]),
                prompt_len=prompt_len,
                plan=plan,
                logit_positions=positions,
            ))
        plan = build_step_plan(requests, int(input_batch.num_tokens),
                               self.logits_position_offset)
        self.sampler.step_plan = plan
        return plan

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
        self.step_plan = plan = None if for_capture else self._plan_step(input_batch)
        num_reqs = input_batch.num_reqs
        num_tokens = input_batch.num_tokens
        query_start_loc_np = input_batch.query_start_loc_np[: num_reqs + 1]
        query_start_loc_gpu = input_batch.query_start_loc[: num_reqs + 1]
        seq_lens = input_batch.seq_lens
        seq_lens_upper = input_batch.seq_lens_cpu_upper_bound
        positions = input_batch.positions
        if plan is not None and plan.fed_tokens is not None:
            # The forward runs on the fed tokens only.
            fed = plan.fed_index(self.device)
            num_tokens = plan.num_fed
            query_start_loc_np = plan.query_start_loc
            query_start_loc_gpu = torch.from_numpy(plan.query_start_loc).to(
                self.device, non_blocking=True)
            slot_mappings = slot_mappings[:, fed]
            positions = positions[: input_batch.num_tokens][fed]
        if plan is not None and plan.seq_lens is not None:
            seq_lens_upper = torch.from_numpy(plan.seq_lens)
            seq_lens = seq_lens_upper.to(self.device, non_blocking=True)
        query_start_loc_cpu = torch.from_numpy(query_start_loc_np)
        max_query_len = int(np.diff(query_start_loc_np).max()) if num_reqs else 0
        max_seq_len = (
            self.max_model_len if for_capture else int(seq_lens_upper[:num_reqs].max())
        )
        return build_attn_metadata(
            attn_groups=attn_groups,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc_gpu=query_start_loc_gpu,
            query_start_loc_cpu=query_start_loc_cpu,
            max_query_len=max_query_len,
            seq_lens=seq_lens,
            max_seq_len=max_seq_len,
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            seq_lens_cpu_upper_bound=seq_lens_upper,
            positions=positions,
            is_prefilling=torch.from_numpy(input_batch.is_prefilling_np),
            for_cudagraph_capture=for_capture,
            causal=False,
            ubatch_idx=ubatch_idx,
            req_idx=input_batch.idx_mapping_np,
        )
