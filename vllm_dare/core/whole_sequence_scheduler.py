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
* A request whose prompt plus ``max_tokens`` exceeds ``max_model_len`` cannot be
  denoised; it is finished with ``finish_reason="error"`` and the reason is logged.
  (The OpenAI server caps ``max_tokens`` at ``max_model_len`` minus the prompt, so
  only direct ``LLM.generate`` callers can reach this.)
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.diffusion_scheduler import DiffusionScheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import DraftTokenIds
from vllm.v1.request import Request, RequestStatus

logger = init_logger(__name__)


def _is_denoising(request: Request) -> bool:
    """Prompt consumed, canvas not yet emitted."""
    return (
        request.num_output_tokens == 0
        and request.num_computed_tokens >= request.num_prompt_tokens
    )


def _sequence_length(request: Request) -> int:
    return request.num_prompt_tokens + (request.max_tokens or 0)


class WholeSequenceDiffusionScheduler(DiffusionScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._too_long: set[str] = set()
        self._rejected: list[Request] = []

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

    def schedule(self, *args, **kwargs):
        # Fail over-long requests before they take KV blocks; their outputs are
        # sent from update_from_output.
        if self._too_long:
            ids = [r for r in self._too_long if r in self.requests]
            self._too_long.clear()
            self._rejected += self.finish_requests(ids, RequestStatus.FINISHED_ERROR)
        budget = self.max_num_scheduled_tokens
        deferred: list[Request] = []
        kept: list[Request] = []
        for request in self.running:
            if _is_denoising(request):
                request.num_computed_tokens = 0
                need = request.num_prompt_tokens + len(request.spec_token_ids)
                if need > budget:
                    deferred.append(request)
                    continue
                budget -= need
            kept.append(request)
        self.running = kept
        try:
            return super().schedule(*args, **kwargs)
        finally:
            # Deferred requests go first next step.
            self.running = deferred + self.running

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
