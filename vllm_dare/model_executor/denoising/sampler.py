"""The diffusion sampler: one denoising step of every request in the batch.

vLLM's Model Runner V2 hands the sampler the logits the step plan asked for: per
request, those of the canvas positions its denoiser may unmask this step (for
Dream read one position earlier; ``cache_policies/step_plan.py``). Each request
owns a denoiser that applies its generation algorithm's step, exactly as the
reference code does, and writes the new canvas into vLLM's draft-token
buffer for the next step. On its last step the request emits the whole canvas as
its output tokens (vLLM then stops at the first EOS).

Bookkeeping for whole-sequence recomputation: for every step that is not final the
sampler reports the request's entire query as rejected, so the worker's
``num_computed_tokens`` returns to 0 (see ``core/whole_sequence_scheduler.py``).

Classifier-free guidance: a guided request has an unconditional twin in the batch
(same canvas, prompt replaced by [MASK]; added by the scheduler). The owner steps
only when its twin was fed the same canvas this step, with
``uncond + (cfg_scale + 1) * (cond - uncond)`` as the logits; the new canvas is
written to both, and both emit together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_dare import vllm_compat
from vllm_dare.cache_policies import CachePolicy, make_policy
from vllm_dare.cache_policies import work_counters
from vllm_dare.cache_policies.dare_reuse import DareRequests, request_settings
from vllm_dare.core.committed_stream import streams
from vllm_dare.model_executor.denoising.denoisers import Denoiser, make_denoiser
from vllm_dare.model_executor.denoising.params import (
    CFG_TWIN_OWNER_KEY,
    CFG_TWIN_SUFFIX,
    DenoisingDefaults,
    resolve_params,
)

logger = init_logger(__name__)

# The runner reads penalties_state.output_bin_counts; None means "no penalties".
_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)


class DenoisingStateError(RuntimeError):
    """A request's step does not match its denoising state (for example a
    forward over part of its sequence)."""


@dataclass
class CfgTwin:
    """The unconditional twin of a guided request: it only mirrors the canvas."""

    owner_req_id: str
    canvas: torch.Tensor

    @property
    def gen_length(self) -> int:
        return self.canvas.shape[0]


class DenoisingSampler:
    def __init__(self, base_sampler: Any, defaults: DenoisingDefaults, device: torch.device):
        self.sampling_states = base_sampler.sampling_states
        self.logprob_token_ids_state = base_sampler.logprob_token_ids_state
        self.req_states = base_sampler.req_states
        self.compute_nans = False
        self.defaults = defaults
        self.device = device
        self.states: dict[int, Denoiser | CfgTwin] = {}
        # Cache policy per slot; the ModelState asks it for each forward's plan
        # (``step_plan``), and records why a request's plan could not be made.
        self.policies: dict[int, CachePolicy] = {}
        self.step_plan = None
        self.plan_failures: dict[int, Exception] = {}
        self.num_layers = 0  # set by the ModelState
        # Token-layer rows the forwards computed for each slot's request.
        self.computed_rows: dict[int, int] = {}
        # DARE (only with the DARE backend): per-request settings, forced-row
        # bookkeeping and reuse counts.
        self.dare = DareRequests(device)
        self.dare_runtime = None  # set by the ModelState
        self.model_name = ""  # Prometheus label, set by the ModelState
        # Where finished requests' figures go (``vllm_compat``'s worker-to-scheduler channel), set by the
        # ModelState: only the first tensor-parallel rank publishes them, into this
        # process (None) or the engine-core process's channel.
        self.publish_stats = True
        self.stats_channel = None
        # Model forwards that processed each slot's request (its NFE).
        self.forwards: dict[int, int] = {}
        # Streaming requests: the committed prefix length reported so far.
        self.streamed: dict[int, int] = {}
        # Filled by the ModelState before add_request: slot <-> request id.
        self.req_id_of_slot: dict[int, str] = {}
        max_reqs = self.req_states.draft_tokens.shape[0]
        width = self.req_states.draft_tokens.shape[1]
        self._sampled = torch.zeros(max_reqs, max(width, 1), dtype=torch.int32, device=device)

    @property
    def penalties_state(self):
        return _NO_PENALTIES

    def add_request(self, req_idx: int, sampling_params: Any) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)
        self.logprob_token_ids_state.add_request(req_idx, sampling_params)
        extra = sampling_params.extra_args or {}
        params = resolve_params(extra, sampling_params.max_tokens, self.defaults)
        prompt_len = int(self.req_states.prompt_len.np[req_idx])  # set before this call
        denoiser = make_denoiser(params, self.defaults.mask_token_id, self.device, prompt_len)
        owner = extra.get(CFG_TWIN_OWNER_KEY)
        self.states[req_idx] = denoiser if owner is None else CfgTwin(owner, denoiser.canvas)
        self.policies[req_idx] = make_policy(params)
        if owner is None and streams(sampling_params):
            self.streamed[req_idx] = 0
        self.dare.add(req_idx, request_settings(extra, self.defaults.dare))

    def remove_request(self, req_idx: int) -> None:
        self.states.pop(req_idx, None)
        self.req_id_of_slot.pop(req_idx, None)
        self.dare.remove(req_idx)
        self.forwards.pop(req_idx, None)
        self.policies.pop(req_idx, None)
        self.plan_failures.pop(req_idx, None)
        self.computed_rows.pop(req_idx, None)
        self.streamed.pop(req_idx, None)

    def _fail(self, req_id: str, slot: int, exc: Exception) -> None:
        """End one request (the scheduler finishes it with finish_reason
        "error"), keep serving the others."""
        reason = f"{type(exc).__name__}: {exc}"
        logger.error("Request %s failed in the diffusion sampler and is ended with "
                     "finish_reason=error: %s", req_id, reason,
                     exc_info=not isinstance(exc, DenoisingStateError))
        self.states.pop(slot, None)
        self.policies.pop(slot, None)
        self.streamed.pop(slot, None)
        if self.publish_stats:
            vllm_compat.report_step("failures", {req_id: reason}, self.stats_channel)

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()
        self.logprob_token_ids_state.apply_staged_writes()

    def __call__(self, logits: torch.Tensor, input_batch: Any, draft_logits=None):
        from vllm.v1.worker.gpu.sample.output import SamplerOutput

        num_reqs = input_batch.num_reqs
        num_logits = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
        row_start = input_batch.cu_num_logits_np[:num_reqs]
        query_lens = np.diff(input_batch.query_start_loc_np[: num_reqs + 1])
        slots = input_batch.idx_mapping_np[:num_reqs]
        batch_index = {rid: i for i, rid in enumerate(input_batch.req_ids[:num_reqs])}
        num_sampled = np.zeros(num_reqs, dtype=np.int32)
        num_rejected = np.zeros(num_reqs, dtype=np.int32)
        sampled = self._sampled[:num_reqs]
        drafts = self.req_states.draft_tokens
        plan, self.step_plan = self.step_plan, None
        if plan is not None and len(plan.logit_start) != num_reqs + 1:
            plan = None  # not this batch's (a dummy run)
        if plan is not None:
            # Work of this forward, per request and for the engine's counters.
            fed = plan.fed_per_request * self.num_layers
            for i in range(num_reqs):
                slot = int(slots[i])
                if slot in self.states:
                    self.computed_rows[slot] = self.computed_rows.get(slot, 0) + int(fed[i])
            if self.publish_stats:
                work_counters.record_forward(int(query_lens.sum()) * self.num_layers,
                                             int(fed.sum()), self.model_name)

        def rows(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Request i's logits rows and their canvas positions."""
            if plan is None:
                start, n = int(row_start[i]), int(num_logits[i])
                return logits[start : start + n], None
            a, b = int(plan.logit_start[i]), int(plan.logit_start[i + 1])
            positions = torch.from_numpy(plan.logit_positions[i]).to(logits.device)
            return logits[a:b], positions

        if self.dare_runtime is not None and self.dare_runtime.num_reqs == num_reqs:
            self.dare.record_step(
                self.dare_runtime, slots, input_batch.req_ids, self.model_name,
                log=logger.debug if logger.isEnabledFor(logging.DEBUG) else None)

        def emit(i: int, canvas: torch.Tensor) -> None:
            sampled[i, : canvas.shape[0]] = canvas.to(torch.int32)
            num_sampled[i] = canvas.shape[0]
            num_rejected[i] = 0
            if not self.publish_stats:
                return
            slot, req_id = int(slots[i]), input_batch.req_ids[i]
            state = self.states[slot]
            vllm_compat.put_request_figures(req_id, "dllm", {
                "forwards": self.forwards.get(slot, 0),
                "computed_rows": self.computed_rows.get(slot, 0),
                "denoising_steps": getattr(state, "steps_run", 0),
                "gen_length": int(canvas.shape[0]),
            }, self.stats_channel)
            dare = self.dare.figures(slot, self.num_layers)
            if dare is not None:
                vllm_compat.put_request_figures(req_id, "dare", dare,
                                                self.stats_channel)

        committed: dict[str, list[int]] = {}

        def report_committed(slot: int, req_id: str, canvas: torch.Tensor) -> None:
            """A streaming request's committed prefix (leading unmasked tokens),
            when it grew."""
            unmasked = (canvas != self.defaults.mask_token_id).to(torch.int32)
            n = int(torch.cumprod(unmasked, 0).sum())
            if n > self.streamed[slot]:
                self.streamed[slot] = n
                committed[req_id] = canvas[:n].tolist()

        def step_request(i: int, slot: int, state) -> None:
            self.forwards[slot] = self.forwards.get(slot, 0) + 1
            failure = self.plan_failures.pop(slot, None)
            if failure is not None:
                raise DenoisingStateError(f"its cache policy failed: {failure!r}")
            # Everything computed this step is thrown away again: the next step
            # recomputes the whole sequence.
            computed_before = int(input_batch.num_computed_tokens_np[i])
            recompute = computed_before + int(query_lens[i])
            n = int(num_logits[i])
            if n == 0:
                if recompute >= int(input_batch.prefill_len_np[i]):  # prompt consumed
                    drafts[slot, : state.gen_length] = state.canvas
                    num_rejected[i] = recompute
                return
            if n != state.gen_length:
                raise DenoisingStateError(
                    f"request in slot {slot} got {n} canvas logits, expected "
                    f"{state.gen_length}"
                )
            if num_sampled[i] == 0:
                num_rejected[i] = recompute
            if isinstance(state, CfgTwin):
                return  # stepped together with its owner

            step_logits, positions = rows(i)
            twin_i = twin_slot = None
            if state.params.cfg_scale > 0:
                twin_i = batch_index.get(self.req_id_of_slot[slot] + CFG_TWIN_SUFFIX)
                if twin_i is not None:
                    twin_slot = int(slots[twin_i])
                synced = (
                    twin_i is not None
                    and int(num_logits[twin_i]) == n
                    and torch.equal(drafts[twin_slot, :n], state.canvas)
                )
                if not synced:
                    # The twin did not see this canvas: no step, resync it.
                    if twin_slot is not None:
                        drafts[twin_slot, :n] = state.canvas
                    return
                uncond, twin_positions = rows(twin_i)
                if twin_positions is not None and not torch.equal(twin_positions, positions):
                    raise DenoisingStateError("its guidance twin's logits are of other "
                                              "canvas positions")
                step_logits = uncond + (state.params.cfg_scale + 1) * (step_logits - uncond)

            if state.step(step_logits, positions):
                emit(i, state.canvas)
                if twin_i is not None:
                    emit(twin_i, state.canvas)
            else:
                drafts[slot, :n] = state.canvas
                if twin_slot is not None:
                    drafts[twin_slot, :n] = state.canvas
                if slot in self.streamed:
                    report_committed(slot, input_batch.req_ids[i], state.canvas)

        for i in range(num_reqs):
            slot = int(slots[i])
            state = self.states.get(slot)
            if state is None:  # dummy / profiling batch
                continue
            try:
                step_request(i, slot, state)
            except Exception as exc:  # one request's trouble never ends the engine
                self._fail(input_batch.req_ids[i], slot, exc)
                num_sampled[i] = 0
                num_rejected[i] = (int(input_batch.num_computed_tokens_np[i])
                                   + int(query_lens[i]))
        if committed and self.publish_stats:
            vllm_compat.report_step("committed", committed, self.stats_channel)
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=None,
            num_nans=None,
            num_sampled=torch.from_numpy(num_sampled).to(self.device),
            num_rejected=torch.from_numpy(num_rejected).to(self.device),
        )
