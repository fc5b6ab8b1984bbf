"""Streaming of a request's committed prefix while it is still denoising.

LLaDA and Dream never change an unmasked token: once a canvas position holds a
token, that token is final. The leading run of unmasked positions of a canvas is
therefore final text, while the rest is still being denoised (for LLaDA it grows
block by block; for Dream, with whatever the unmasking order gives). A streaming
request (``output_kind`` not ``FINAL_ONLY``: the OpenAI server's ``stream=true``,
``AsyncLLM`` with ``DELTA`` / ``CUMULATIVE``) gets that prefix as it grows, as
ordinary engine outputs, and the final output carries the rest.

The canvas lives on the worker (vLLM hands the scheduler placeholders for the
draft tokens), so after each step the diffusion sampler reports, for each
streaming request whose committed prefix grew, that prefix
(``vllm_compat.report_step("committed", ...)``), and the scheduler sends the new part with
the same step's outputs: a token reaches the client with the output of the step
that unmasked it.

A prefix is streamed only up to its first stop token (EOS unless
``ignore_eos``, and the request's ``stop_token_ids``; ``min_tokens`` is not
considered, which only ever streams less): vLLM ends the output
there, and the final output then carries the stop token and whatever vLLM keeps
after it, so the streamed tokens are always a prefix of the non-streamed output.
The tokens a request has streamed are not part of its ``output_token_ids`` in
the scheduler (they are appended there, with the rest, when the canvas is
done), so the whole-sequence bookkeeping of the scheduler is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vllm.sampling_params import RequestOutputKind


def streams(sampling_params) -> bool:
    """Whether the client reads the request's output as it is produced. A
    request with ``repetition_detection`` gets its output when it finishes:
    vLLM may end such an output anywhere in the canvas, also inside a prefix
    that would already have been sent."""
    return (sampling_params is not None
            and sampling_params.output_kind != RequestOutputKind.FINAL_ONLY
            and sampling_params.repetition_detection is None)


def stop_token_ids(request) -> set[int]:
    """The token ids at which vLLM ends this request's output (its stop checks
    in ``vllm.v1.core.sched.utils.check_stop``: the EOS of the sampling
    parameters, None with ``ignore_eos``, and ``stop_token_ids``)."""
    params = request.sampling_params
    stops = set(params.stop_token_ids or ())
    if params.eos_token_id is not None:
        stops.add(params.eos_token_id)
    return stops


def committed_prefix(canvas: Sequence[int], mask_token_id: int,
                     stops: Iterable[int]) -> int:
    """Length of the canvas's final prefix that may be streamed: the leading
    unmasked tokens, up to (not including) the first stop token."""
    stops = set(stops)
    n = 0
    for token in canvas:
        if token == mask_token_id or token in stops:
            break
        n += 1
    return n


class CommittedStream:
    """What each streaming request has been sent so far (scheduler side)."""

    def __init__(self, mask_token_id: int) -> None:
        self.mask_token_id = mask_token_id
        self.sent: dict[str, list[int]] = {}

    def new_tokens(self, request, canvas: Sequence[int]) -> list[int]:
        """The tokens of ``canvas``'s committed prefix (``canvas`` may be the
        prefix itself) not yet sent; records them as sent. ValueError if the canvas disagrees with what was sent
        (a request restarted after preemption that did not regenerate the same
        tokens: unseeded sampling)."""
        n = committed_prefix(canvas, self.mask_token_id, stop_token_ids(request))
        sent = self.sent.setdefault(request.request_id, [])
        if n <= len(sent):
            return []
        if list(canvas[: len(sent)]) != sent:
            raise ValueError(
                "its canvas no longer starts with the tokens already streamed "
                "(restarted after preemption with unseeded sampling)")
        new = list(canvas[len(sent):n])
        sent.extend(new)
        return new

    def rest_of_output(self, request_id: str, output_tokens: list[int]) -> list[int]:
        """The final output's tokens less those already streamed; forgets the
        request. ValueError if the output does not start with them."""
        sent = self.sent.pop(request_id, None)
        if not sent:
            return output_tokens
        if output_tokens[: len(sent)] != sent:
            raise ValueError(
                "its final output does not start with the tokens already streamed "
                "(restarted after preemption with unseeded sampling)")
        return output_tokens[len(sent):]

    def forget(self, live_request_ids) -> None:
        """Drop what is kept for requests that are gone (aborted, failed)."""
        for request_id in [r for r in self.sent if r not in live_request_ids]:
            del self.sent[request_id]
