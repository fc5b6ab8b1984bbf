"""OpenAI ``temperature`` / ``seed`` and a default ``max_tokens`` for diffusion
models, as an ASGI middleware (installed by ``vllm-dare serve``).

vLLM 0.32/0.33 refuses a request to a diffusion model whose ``temperature`` is not
1.0 or that sets ``seed`` (``SamplingParams._validate_diffusion``), so standard
OpenAI clients that always send them (lm-eval sends ``temperature: 0`` and
``seed: 1234`` with every request) cannot talk to a dLLM server. With

    vllm serve MODEL --middleware vllm_dare.entrypoints.sampling_middleware.DiffusionSamplingMiddleware

the server reads an explicit ``temperature`` as the denoising temperature
(``vllm_xargs.dllm_temperature``; 0 = greedy) and ``seed`` as the request's own
denoising seed (``vllm_xargs.dllm_seed``) on ``/v1/completions`` and
``/v1/chat/completions``. Setting both forms of the same knob is an HTTP 400.

A ``/v1/completions`` request without ``max_tokens`` gets the served canvas (at
most ``max_model_len``; vLLM then caps it at what ``max_model_len`` leaves after
the prompt), as a chat request
without it does through the engine's default (``engine_config.py``); vLLM's own
completions default is 16 tokens.

Requests without these fields, and every other route, pass through untouched.
"""

from __future__ import annotations

import json
from typing import Any

PATHS = ("/v1/completions", "/v1/chat/completions")
MAPPED = (("temperature", "dllm_temperature"), ("seed", "dllm_seed"))


def default_max_tokens(app) -> int | None:
    """The default ``max_tokens`` of the vLLM API server ``app``: its served
    canvas (``DiffusionConfig.canvas_length``), at most ``max_model_len`` (vLLM
    refuses more, and caps it further at what the prompt leaves); None if it
    serves no diffusion model."""
    config = getattr(getattr(app, "state", None), "vllm_config", None)
    diffusion = getattr(config, "diffusion_config", None)
    length = getattr(diffusion, "canvas_length", None)
    if length is None:
        return None
    return min(int(length), int(config.model_config.max_model_len))


def fill_default_max_tokens(path: str, body: dict[str, Any], canvas: int | None) -> bool:
    """Give a completions request without ``max_tokens`` the served canvas;
    True if changed."""
    if path != "/v1/completions" or canvas is None or body.get("max_tokens") is not None:
        return False
    body["max_tokens"] = canvas
    return True


def move_sampling_fields(body: dict[str, Any]) -> bool:
    """Move ``temperature`` / ``seed`` into ``vllm_xargs``; True if changed.
    ValueError if a knob is given both ways."""
    changed = False
    for field, knob in MAPPED:
        if field not in body:
            continue
        value = body.pop(field)
        changed = True
        if value is None:
            continue
        xargs = body.get("vllm_xargs")
        if xargs is None:
            xargs = body["vllm_xargs"] = {}
        if not isinstance(xargs, dict):
            raise ValueError("vllm_xargs must be an object")
        if knob in xargs:
            raise ValueError(
                f"set either {field!r} or vllm_xargs.{knob}, not both "
                f"(with this server's DiffusionSamplingMiddleware they mean the same)"
            )
        xargs[knob] = value
    return changed


class DiffusionSamplingMiddleware:
    """Pure ASGI middleware (``vllm serve --middleware``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") not in PATHS):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None  # vLLM answers malformed JSON itself
        if isinstance(payload, dict):
            try:
                changed = move_sampling_fields(payload)
                canvas = default_max_tokens(scope.get("app"))
                changed |= fill_default_max_tokens(scope["path"], payload, canvas)
                if changed:
                    body = json.dumps(payload).encode()
            except ValueError as e:
                await _bad_request(send, str(e))
                return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = dict(scope, headers=headers)
        message = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([message], receive), send)


def _replay(messages, receive):
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _bad_request(send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError",
                                 "param": None, "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
