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
* KV-cache blocks: a request starts only when the blocks of its whole sequence
  are free (a guided request: those of its twin too), running requests keep
  theirs reserved, and a pair is preempted whole (see ``schedule``). A guided
  request whose pair cannot fit in the whole KV cache is failed like an
  over-long one.
* Classifier-free guidance (LLaDA ``dllm_cfg_scale > 0``): the reference runs a
  second forward per step with the prompt replaced by [MASK]. The scheduler adds
  an internal *twin* request with that prompt, schedules owner and twin together,
  finishes them together, and never reports the twin to the client. The sampler
  combines the two rows of logits (see ``denoising/sampler.py``).
* A request whose prompt plus ``max_tokens`` exceeds ``max_model_len`` gets
  ``max_tokens`` capped at ``max_model_len`` minus its prompt, the rule vLLM's
  OpenAI server applies before the engine sees it; if its knobs do not fit the
  capped length (a LLaDA block length that does not divide it), or nothing is
  left, it is finished with ``finish_reason="error"`` and the reason is logged.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.diffusion_scheduler import DiffusionScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.outputs import DraftTokenIds
from vllm.v1.request import Request, RequestStatus

from vllm_dare import vllm_compat
from vllm_dare.core.committed_stream import CommittedStream, streams
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


def _take(queue, requests: list[Request]) -> None:
    """Remove ``requests`` from a request queue; without scanning it when they
    lead a first-come-first-served queue (the usual case)."""
    left = set(requests)
    if isinstance(queue, deque):
        while left and queue and queue[0] in left:
            left.discard(queue.popleft())
    if left:
        queue.remove_requests(left)


class WholeSequenceDiffusionScheduler(DiffusionScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._defaults = DenoisingDefaults.decode(
            vllm_compat.engine_settings(self.vllm_config))
        # Requests that can never be served, failed at the next schedule().
        self._unservable: set[str] = set()
        self._rejected: list[Request] = []
        # owner request id -> its unconditional twin's id
        self._twins: dict[str, str] = {}
        # Tokens streamed so far to each streaming request's client.
        self._stream = CommittedStream(self._defaults.mask_token_id)
        # Workers in child processes leave finished requests' figures there.
        self._stats_channel = None
        if self.vllm_config.parallel_config.distributed_executor_backend == "mp":
            self._stats_channel = vllm_compat.stats_channel(os.getpid())
            vllm_compat.clear_stats_channel(self._stats_channel)

    def shutdown(self) -> None:
        super().shutdown()
        if self._stats_channel is not None:
            vllm_compat.clear_stats_channel(self._stats_channel)

    # ------------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        reason = None
        if not is_cfg_twin(request.request_id):
            reason = self._fit_to_max_model_len(request)
        super().add_request(request)
        params = request.sampling_params
        guided = False
        if reason is None and params is not None and not is_cfg_twin(request.request_id):
            try:
                resolved = resolve_params(params.extra_args, params.max_tokens,
                                          self._defaults)
            except ValueError as e:
                reason = str(e)
            else:
                guided = resolved.cfg_scale > 0
        if reason is None:
            reason = self._unservable_reason(request, guided)
        if reason is not None:
            logger.error("Request %s: %s, so the request is rejected.",
                         request.request_id, reason)
            self._unservable.add(request.request_id)
            return
        if guided:
            twin = self._make_cfg_twin(request)
            super().add_request(twin)
            self._twins[request.request_id] = twin.request_id

    def _fit_to_max_model_len(self, request: Request) -> str | None:
        """Cap ``max_tokens`` at what ``max_model_len`` leaves after the prompt,
        as vLLM's OpenAI server does before a request reaches the engine, so that
        ``LLM.generate`` and the server treat such a request alike. Returns why
        the request cannot be served if nothing is left."""
        room = self.max_model_len - request.num_prompt_tokens
        if request.max_tokens <= room:
            return None
        if room <= 0:
            return (f"its prompt ({request.num_prompt_tokens} tokens) leaves no room "
                    f"for a canvas within max_model_len={self.max_model_len}")
        logger.info("Request %s: max_tokens %d capped at %d (max_model_len=%d less the "
                    "%d-token prompt).", request.request_id, request.max_tokens, room,
                    self.max_model_len, request.num_prompt_tokens)
        # A copy: the caller's SamplingParams may be this very object.
        request.sampling_params = request.sampling_params.clone()
        request.sampling_params.max_tokens = room
        request.max_tokens = room
        return None

    def _unservable_reason(self, request: Request, guided: bool) -> str | None:
        length = _sequence_length(request)
        sequences = 2 if guided else 1
        if sequences > self.max_num_running_reqs:
            return (
                "with classifier-free guidance it runs as two sequences (the request "
                f"and its unconditional twin) and max_num_seqs is {self.max_num_running_reqs}"
            )
        if sequences * length > self._step_budget():
            # Only a guided request can get here (the step budget is raised to at
            # least max_model_len).
            return (
                f"with classifier-free guidance its {length} tokens run twice in every "
                f"step (the request and its unconditional twin), {2 * length} tokens, and "
                f"a step holds {self._step_budget()} "
                "(raise --max-num-batched-tokens)"
            )
        needed = sequences * self._blocks_for(length)
        usable = self.kv_cache_manager.block_pool.num_gpu_blocks - 1  # less the null block
        if needed > usable:
            what = (f"with classifier-free guidance its {length} tokens run twice (the "
                    "request and its unconditional twin, at the same time)" if guided
                    else f"its {length} tokens")
            return (f"{what} need {needed} KV-cache blocks of {self.block_size} tokens "
                    f"and the KV cache has {usable}")
        return None

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

    def _blocks_for(self, num_tokens: int) -> int:
        """KV-cache blocks that hold ``num_tokens`` slots (the served models have
        one full-attention KV-cache group)."""
        return cdiv(num_tokens + self.num_lookahead_tokens, self.block_size)

    def _blocks_held(self, request: Request) -> int:
        return len(self.kv_cache_manager.get_block_ids(request.request_id)[0])

    def _blocks_to_finish(self, group: list[Request]) -> int:
        """New blocks the group needs to hold its whole sequences."""
        return sum(self._blocks_for(_sequence_length(m)) - self._blocks_held(m) for m in group)

    def _groups(self, requests: Iterable[Request], partners: dict[str, str]) -> list[list[Request]]:
        """``requests`` in order, a guided request and its twin as one group when
        both are among them."""
        requests = list(requests)
        present = {r.request_id: r for r in requests}
        groups, seen = [], set()
        for request in requests:
            if request.request_id in seen:
                continue
            group = [request]
            partner = present.get(partners.get(request.request_id, ""))
            if partner is not None:
                group.append(partner)
            seen.update(m.request_id for m in group)
            groups.append(group)
        return groups

    def _preempt(self, requests: list[Request], timestamp: float) -> int:
        """Preempt running requests (taken out of ``self.running`` first); returns
        the blocks freed."""
        freed = 0
        for request in requests:
            freed += self._blocks_held(request)
            self.running.remove(request)
            self._preempt_request(request, timestamp)
        return freed

    def schedule(self, *args, **kwargs):
        """Decide, before vLLM's scheduler runs, which running requests go in this
        step and which waiting ones may start, so that a request is always run
        whole and a guided request never runs without its twin:

        1. a running member of a guided pair whose partner is not running is
           preempted (it cannot step alone; its blocks go back to the pool);
        2. running groups (a pair counts as one), in queue order (by priority
           under the priority policy), reserve the blocks of their whole
           sequences; when they do not fit, whole groups are preempted from the
           end (the lowest priority), the group itself last.
           A group whose tokens do not fit this step's budget waits for the next
           step, ahead of the others;
        3. waiting groups start only when the blocks of their whole sequences, the
           tokens of their prompts and a request slot per member are left; the
           first that does not fit and all after it wait (first come, first
           served; ``_startable``). vLLM would otherwise start a request on the
           blocks of its prompt alone and preempt it, or another, one step later.
        """
        if self._unservable:
            ids = [r for r in self._unservable if r in self.requests]
            self._unservable.clear()
            self._rejected += self.finish_requests(ids, RequestStatus.FINISHED_ERROR)

        timestamp = time.monotonic()
        partners = self._partners()
        running_ids = {r.request_id for r in self.running}
        lone = [r for r in self.running
                if r.request_id in partners and partners[r.request_id] not in running_ids]
        self._preempt(lone, timestamp)

        budget = self._step_budget()
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        groups = self._groups(self.running, partners)
        if self.policy == SchedulingPolicy.PRIORITY:  # else first come, first served
            groups.sort(key=lambda group: (group[0].priority, group[0].arrival_time))
        kept: list[Request] = []
        deferred: list[Request] = []
        # Requests whose prompt is still being consumed (started on part of a
        # step's budget): they may take a further chunk, so they go after every
        # whole sequence, where vLLM gives them what is left.
        prompt_chunks: list[Request] = []
        i = 0
        while i < len(groups):
            group = groups[i]
            need_blocks = self._blocks_to_finish(group)
            while need_blocks > free and len(groups) > i + 1:
                free += self._preempt(groups.pop(), timestamp)
            if need_blocks > free:
                self._preempt(group, timestamp)
                groups.pop(i)
                continue
            free -= need_blocks
            i += 1
            if len(group) == 1 and not _is_denoising(group[0]):
                prompt_chunks.append(group[0])
                continue
            need_tokens = 0
            for member in group:
                if _is_denoising(member):
                    need_tokens += member.num_prompt_tokens + len(member.spec_token_ids)
                else:  # a pair's prompts are consumed whole, in one step
                    need_tokens += member.num_prompt_tokens - member.num_computed_tokens
            if need_tokens <= budget:
                budget -= need_tokens
                for member in group:
                    if _is_denoising(member):
                        # Recompute the whole sequence (a deferred request keeps
                        # its count, so that it still reads as denoising).
                        member.num_computed_tokens = 0
                kept.extend(group)
            else:
                deferred.extend(group)
        for request in prompt_chunks:
            if budget > 0:
                budget -= min(request.num_prompt_tokens - request.num_computed_tokens, budget)
                kept.append(request)
            else:
                deferred.append(request)

        slots = (self.max_num_running_reqs - len(kept) - len(deferred)
                 - self.num_waiting_for_streaming_input)
        startable = self._startable(partners, budget, free, slots)
        # vLLM's scheduler sees only the requests that may start; the rest of the
        # queue is set aside (touching the queue costs the started requests, not
        # the queue's length).
        waiting = self.waiting
        _take(waiting, startable)
        self.waiting = create_request_queue(self.policy)
        for request in startable:
            self.waiting.add_request(request)
        self.running = kept
        try:
            return super().schedule(*args, **kwargs)
        finally:
            # Deferred requests go first next step; requests that did not start
            # (or were preempted) go back in front of the queue's rest.
            self.running = deferred + self.running
            not_started = list(self.waiting)
            self.waiting = waiting
            waiting.prepend_requests(reversed(not_started))

    def _step_budget(self) -> int:
        """Tokens one step may schedule: vLLM's scheduler stops at the smaller of
        its two budgets (``max_num_scheduled_tokens`` and
        ``max_num_batched_tokens``)."""
        return min(self.max_num_scheduled_tokens,
                   self.scheduler_config.max_num_batched_tokens)

    def _startable(self, partners: dict[str, str], budget: int, free: int,
                   slots: int) -> list[Request]:
        """The waiting requests that may start this step, in queue order: each
        group (a guided request with its twin) while the blocks of its whole
        sequences, its prompts' tokens and a request slot per member are left; the
        first group that does not fit ends the list (first come, first served)."""
        startable: list[Request] = []
        taken: set[str] = set()
        for request in self.waiting:
            if request.request_id in taken:
                continue
            group = [request]
            partner = self.requests.get(partners.get(request.request_id, ""))
            if partner is not None:
                group.append(partner)  # waiting too: lone running members were preempted
            need_tokens = sum(m.num_prompt_tokens - m.num_computed_tokens for m in group)
            # A single request may start on part of the budget (chunked prefill);
            # a pair must start both prompts in the same step.
            tokens_fit = need_tokens <= budget or (len(group) == 1 and budget > 0)
            need_blocks = self._blocks_to_finish(group)
            if not (tokens_fit and need_blocks <= free and len(group) <= slots):
                break
            budget -= min(need_tokens, budget)
            free -= need_blocks
            slots -= len(group)
            startable += group
            taken.update(m.request_id for m in group)
        return startable

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

    def _end_failed_requests(self) -> None:
        """Finish, with finish_reason "error", the requests the worker failed in
        this step (a guided request with its twin); their outputs leave with the
        rejected ones."""
        failures = vllm_compat.take_step_reports("failures", self._stats_channel)
        if not failures:
            return
        owners = {}
        for req_id, reason in failures.items():
            owner = req_id.removesuffix(CFG_TWIN_SUFFIX)
            if owner in self.requests:
                owners[owner] = reason
        for owner, reason in owners.items():
            logger.error("Request %s ended with finish_reason=error: %s", owner, reason)
        self._rejected += self.finish_requests(list(owners), RequestStatus.FINISHED_ERROR)

    def _stream_committed(self, outputs) -> None:
        """Send each streaming request that is still denoising the new tokens
        of the committed prefix its worker reported this step
        (``committed_stream``). A request whose canvas disagrees with what it was
        sent is ended with finish_reason "error"."""
        for req_id, prefix in vllm_compat.take_step_reports("committed",
                                                            self._stats_channel).items():
            request = self.requests.get(req_id)
            if (request is None or request.is_finished()
                    or not streams(request.sampling_params)):
                continue
            try:
                new = self._stream.new_tokens(request, prefix)
            except ValueError as e:
                logger.error("Request %s ended with finish_reason=error: %s", req_id, e)
                self._rejected += self.finish_requests([req_id], RequestStatus.FINISHED_ERROR)
                continue
            if not new:
                continue
            prefill_stats = request.take_prefill_stats()
            if prefill_stats is not None:
                prefill_stats.finalize(self.kv_cache_manager.estimate_cached_tokens(request))
            output = EngineCoreOutput(
                request_id=req_id,
                new_token_ids=new,
                events=request.take_events(),
                prefill_stats=prefill_stats,
                trace_headers=request.trace_headers,
            )
            if request.client_index in outputs:
                outputs[request.client_index].outputs.append(output)
            else:
                outputs[request.client_index] = EngineCoreOutputs(outputs=[output])

    def _without_streamed_tokens(self, output: EngineCoreOutput) -> None:
        """A finished request's last output carries only what was not streamed."""
        try:
            output.new_token_ids = self._stream.rest_of_output(
                output.request_id, list(output.new_token_ids))
        except ValueError as e:
            logger.error("Request %s ended with finish_reason=error: %s",
                         output.request_id, e)
            output.new_token_ids = []
            output.finish_reason = FinishReason.ERROR

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._end_failed_requests()
        self._stream_committed(outputs)
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
                    vllm_compat.take_request_figures(o.request_id, self._stats_channel)  # the twin's
            engine_outputs.outputs = kept
            for output in engine_outputs.outputs:
                if output.finish_reason is not None:
                    if self._stream.sent:
                        self._without_streamed_tokens(output)
                    stats = vllm_compat.take_request_figures(output.request_id,
                                                             self._stats_channel)
                    if stats is not None:
                        output.kv_transfer_params = {
                            **(output.kv_transfer_params or {}), **stats
                        }
            if engine_outputs.finished_requests:
                engine_outputs.finished_requests = {
                    r for r in engine_outputs.finished_requests if not is_cfg_twin(r)
                }
        if self._stream.sent:
            self._stream.forget(self.requests)
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
