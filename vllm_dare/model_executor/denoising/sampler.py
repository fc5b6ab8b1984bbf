"""The diffusion sampler: one denoising step of every request in the batch.

vLLM's Model Runner V2 hands the sampler the logits of each request's canvas
(its ``max_tokens`` masked/unmasked positions; for Dream already shifted by one).
Each request owns a denoiser that applies its generation algorithm's step, exactly
as the reference code does, and writes the new canvas into vLLM's draft-token
buffer for the next step. On its last step the request emits the whole canvas as
its output tokens (vLLM then stops at the first EOS).

Bookkeeping for whole-sequence recomputation: for every step that is not final the
sampler reports the request's entire query as rejected, so the worker's
``num_computed_tokens`` returns to 0 (see ``core/whole_sequence_scheduler.py``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from vllm_dare.model_executor.denoising.denoisers import Denoiser, make_denoiser
from vllm_dare.model_executor.denoising.params import DenoisingDefaults, resolve_params

# The runner reads penalties_state.output_bin_counts; None means "no penalties".
_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)


class DenoisingSampler:
    def __init__(self, base_sampler: Any, defaults: DenoisingDefaults, device: torch.device):
        self.sampling_states = base_sampler.sampling_states
        self.logprob_token_ids_state = base_sampler.logprob_token_ids_state
        self.req_states = base_sampler.req_states
        self.compute_nans = False
        self.defaults = defaults
        self.device = device
        self.denoisers: dict[int, Denoiser] = {}
        max_reqs = self.req_states.draft_tokens.shape[0]
        width = self.req_states.draft_tokens.shape[1]
        self._sampled = torch.zeros(max_reqs, max(width, 1), dtype=torch.int32, device=device)

    @property
    def penalties_state(self):
        return _NO_PENALTIES

    def add_request(self, req_idx: int, sampling_params: Any) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)
        self.logprob_token_ids_state.add_request(req_idx, sampling_params)
        params = resolve_params(
            sampling_params.extra_args, sampling_params.max_tokens, self.defaults
        )
        self.denoisers[req_idx] = make_denoiser(
            params, self.defaults.mask_token_id, self.device
        )

    def remove_request(self, req_idx: int) -> None:
        self.denoisers.pop(req_idx, None)

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()
        self.logprob_token_ids_state.apply_staged_writes()

    def __call__(self, logits: torch.Tensor, input_batch: Any, draft_logits=None):
        from vllm.v1.worker.gpu.sample.output import SamplerOutput

        num_reqs = input_batch.num_reqs
        num_logits = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
        query_lens = np.diff(input_batch.query_start_loc_np[: num_reqs + 1])
        num_sampled = np.zeros(num_reqs, dtype=np.int32)
        num_rejected = np.zeros(num_reqs, dtype=np.int32)
        sampled = self._sampled[:num_reqs]
        draft_tokens = self.req_states.draft_tokens
        row = 0
        for i in range(num_reqs):
            slot = int(input_batch.idx_mapping_np[i])
            denoiser = self.denoisers.get(slot)
            n = int(num_logits[i])
            rows = logits[row : row + n]
            row += n
            if denoiser is None:  # dummy / profiling batch
                continue
            computed_before = int(input_batch.num_computed_tokens_np[i])
            # Everything computed this step is thrown away again: the next step
            # recomputes the whole sequence.
            recompute = computed_before + int(query_lens[i])
            if n == 0:
                prompt_done = computed_before + int(query_lens[i]) >= int(
                    input_batch.prefill_len_np[i]
                )
                if prompt_done:
                    draft_tokens[slot, : denoiser.gen_length] = denoiser.canvas
                    num_rejected[i] = recompute
                continue
            if n != denoiser.gen_length:
                raise RuntimeError(
                    f"request in slot {slot} got {n} canvas logits, expected "
                    f"{denoiser.gen_length}"
                )
            finished = denoiser.step(rows)
            if finished:
                sampled[i, :n] = denoiser.canvas.to(torch.int32)
                num_sampled[i] = n
            else:
                draft_tokens[slot, :n] = denoiser.canvas
                num_rejected[i] = recompute
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=None,
            num_nans=None,
            num_sampled=torch.from_numpy(num_sampled).to(self.device),
            num_rejected=torch.from_numpy(num_rejected).to(self.device),
        )
