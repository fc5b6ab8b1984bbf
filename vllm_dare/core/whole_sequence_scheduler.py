"""A ``DiffusionScheduler`` that recomputes a request's whole sequence every step.

The reference LLaDA/Dream generation runs one full bidirectional forward over
prompt + canvas at every denoising step: the prompt's keys and values change as
the canvas is unmasked, because the prompt attends to it. vLLM's upstream
diffusion path schedules only the canvas (drafts) of a running request and keeps
the prompt's KV from its prefill. This subclass, the hook vLLM documents for
diffusion (a user-given ``scheduler_cls`` is kept when a diffusion config is set),
makes the engine follow the reference:

* After a request's prompt has been consumed, its ``num_computed_tokens`` is put
  back to 0 before every step, so the scheduler asks for prompt + canvas again,
  in the same KV slots. The worker-side sampler reports the whole query as
  rejected, so Model Runner V2's own count stays at 0 as well.
* A denoising request is scheduled whole or not at all in a step (a partial
  sequence would not be the reference forward); those that do not fit the token
  budget wait for the next step, ahead of the others.
* A request's canvas is exactly ``max_tokens`` wide.
* Classifier-free guidance (LLaDA ``dllm_cfg_scale > 0``): the reference runs a
  second forward per step with the prompt replaced by [MASK]. The scheduler adds
  an internal *twin* request with that prompt, schedules owner and twin together,
  finishes them together, and never reports the twin to the client. The sampler
  combines the two rows of logits (see ``denoising/sampler.py``).
* A request whose prompt plus ``max_tokens`` exceeds ``max_model_len`` cannot be
  denoised; it is finished with ``finish_reason="error"`` and the reason is logged.
  (The OpenAI server caps ``max_tokens`` at ``max_model_len`` minus the prompt, so
  only direct ``LLM.generate`` callers can reach this.)
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm.logger import init_logger
from vllm.v1.core.sched.diffusion_scheduler import DiffusionScheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import DraftTokenIds
from vllm.v1.request import Request, RequestStatus

from vllm_dare import request_stats
from vllm_dare.model_executor.denoising.params import (
    CFG_TWIN_OWNER_KEY,
    CFG_TWIN_SUFFIX,
    DenoisingDefaults,
    resolve_params,
)

logger = init_logger(__name__)


def _is_denoising(request: Request) -> bool:
    """Prompt consumed, canvas not yet emitted."""
    return (
        request.num_output_tokens == 0
        and request.num_computed_tokens >= request.num_prompt_tokens
    )


def _sequence_length(request: Request) -> int:
    return request.num_prompt_tokens + (request.max_tokens or 0)


def is_cfg_twin(request_id: str) -> bool:
    return request_id.endswith(CFG_TWIN_SUFFIX)


class WholeSequenceDiffusionScheduler(DiffusionScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hf_config = self.vllm_config.model_config.hf_config
        self._defaults = DenoisingDefaults.decode(hf_config.denoising_defaults)
        self._too_long: set[str] = set()
        self._rejected: list[Request] = []
        # owner request id -> its unconditional twin's id
        self._twins: dict[str, str] = {}

    # ------------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        if _sequence_length(request) > self.max_model_len:
            logger.error(
                "Request %s: prompt (%d tokens) + max_tokens (%d) exceeds "
                "max_model_len=%d; a diffusion model denoises all max_tokens "
                "positions at once, so the request is rejected.",
                request.request_id,
                request.num_prompt_tokens,
                request.max_tokens,
                self.max_model_len,
            )
            self._too_long.add(request.request_id)
            return
        params = request.sampling_params
        if params is not None and not is_cfg_twin(request.request_id):
            resolved = resolve_params(params.extra_args, params.max_tokens, self._defaults)
            if resolved.cfg_scale > 0:
                twin = self._make_cfg_twin(request)
                super().add_request(twin)
                self._twins[request.request_id] = twin.request_id

    def _make_cfg_twin(self, request: Request) -> Request:
        params = request.sampling_params.clone()
        params.extra_args = {
            **(params.extra_args or {}),
            CFG_TWIN_OWNER_KEY: request.request_id,
        }
        return Request(
            request_id=request.request_id + CFG_TWIN_SUFFIX,
            prompt_token_ids=[self._defaults.mask_token_id] * request.num_prompt_tokens,
            sampling_params=params,
            pooling_params=None,
            client_index=request.client_index,
            arrival_time=request.arrival_time,
            priority=request.priority,
        )

    # ------------------------------------------------------------------ scheduling

    def _partners(self) -> dict[str, str]:
        pairs = {}
        for owner, twin in self._twins.items():
            pairs[owner] = twin
            pairs[twin] = owner
        return pairs

    def schedule(self, *args, **kwargs):
        # Fail over-long requests before they take KV blocks; their outputs are
        # sent from update_from_output.
        if self._too_long:
            ids = [r for r in self._too_long if r in self.requests]
            self._too_long.clear()
            self._rejected += self.finish_requests(ids, RequestStatus.FINISHED_ERROR)

        budget = self.max_num_scheduled_tokens
        partners = self._partners()
        running_ids = {r.request_id for r in self.running}
        decided: dict[str, bool] = {}
        kept: list[Request] = []
        deferred: list[Request] = []
        for request in self.running:
            rid = request.request_id
            if rid not in decided:
                group = [request]
                partner_id = partners.get(rid)
                if partner_id in running_ids:
                    group.append(self.requests[partner_id])
                need = 0
                for member in group:
                    if _is_denoising(member):
                        member.num_computed_tokens = 0
                        need += member.num_prompt_tokens + len(member.spec_token_ids)
                fits = need <= budget
                if fits:
                    budget -= need
                for member in group:
                    decided[member.request_id] = fits
            (kept if decided[rid] else deferred).append(request)
        self.running = kept
        try:
            return super().schedule(*args, **kwargs)
        finally:
            # Deferred requests go first next step.
            self.running = deferred + self.running

    # ------------------------------------------------------------------ finishing

    def finish_requests(
        self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus
    ) -> list[Request]:
        if request_ids is not None:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            ids |= {self._twins[r] for r in ids if r in self._twins}
            request_ids = ids
        finished = super().finish_requests(request_ids, finished_status)
        for request in finished:
            self._twins.pop(request.request_id, None)
        return [r for r in finished if not is_cfg_twin(r.request_id)]

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in self._rejected:
            output = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.get_finished_reason(),
                events=request.take_events(),
                trace_headers=request.trace_headers,
            )
            if request.client_index in outputs:
                outputs[request.client_index].outputs.append(output)
            else:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[output])
        self._rejected.clear()
        if self._twins:
            # Owners that finished this step took their twins with them.
            for owner in [o for o in self._twins if o not in self.requests]:
                twin = self._twins.pop(owner)
                if twin in self.requests:
                    super().finish_requests([twin], RequestStatus.FINISHED_ABORTED)
        for engine_outputs in outputs.values():
            kept = []
            for o in engine_outputs.outputs:
                if not is_cfg_twin(o.request_id):
                    kept.append(o)
                elif o.finish_reason is not None:
                    request_stats.take(o.request_id)  # the twin's figures
            engine_outputs.outputs = kept
            for output in engine_outputs.outputs:
                if output.finish_reason is not None:
                    stats = request_stats.take(output.request_id)
                    if stats is not None:
                        output.kv_transfer_params = {
                            **(output.kv_transfer_params or {}), **stats
                        }
            if engine_outputs.finished_requests:
                engine_outputs.finished_requests = {
                    r for r in engine_outputs.finished_requests if not is_cfg_twin(r)
                }
        return outputs

    def update_draft_token_ids(self, draft_token_ids: DraftTokenIds) -> None:
        # The worker hands over the served canvas; a request's canvas is its
        # max_tokens wide.
        for i, (req_id, token_ids) in enumerate(
            zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids)
        ):
            request = self.requests.get(req_id)
            if request is not None and len(token_ids) > request.max_tokens:
                draft_token_ids.draft_token_ids[i] = token_ids[: request.max_tokens]
        super().update_draft_token_ids(draft_token_ids)
