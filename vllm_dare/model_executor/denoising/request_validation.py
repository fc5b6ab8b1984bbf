"""Admission-time validation of diffusion requests.

vLLM's Model Runner V2 calls ``LogitsProcessor.validate_params`` for every request
at admission, in the API process, and turns a ``ValueError`` into a
``VLLMValidationError`` (HTTP 400 from the server, an exception from
``LLM.generate``) without touching the engine. That is the supported per-request
validation hook, so the plugin installs one processor class per served model
through ``model_config.logits_processors``. It never edits logits: the diffusion
sampler replaces vLLM's sampler, so ``apply`` is never reached.

The class must be importable by name in every process, and it needs the served
model's defaults. Its name therefore carries them:
``DenoisingRequestValidator_<encoded DenoisingDefaults>``, built on first access
(``vllm_compat.classes_by_name``).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from vllm_dare.cache_policies.dare_reuse import request_settings
from vllm_dare.vllm_compat import classes_by_name
from vllm_dare.model_executor.denoising.params import DenoisingDefaults, resolve_params

_PREFIX = "DenoisingRequestValidator_"


def validate_request(sampling_params, defaults: DenoisingDefaults) -> None:
    """Raise ValueError with a clear message if the request cannot be served."""
    if sampling_params.logprobs is not None or sampling_params.prompt_logprobs is not None:
        raise ValueError(
            "logprobs and prompt_logprobs are not supported for diffusion models "
            "served by vllm-dare"
        )
    resolve_params(sampling_params.extra_args, sampling_params.max_tokens, defaults)
    request_settings(sampling_params.extra_args, defaults.dare)


class _DenoisingRequestValidator(LogitsProcessor):
    defaults: DenoisingDefaults

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_request(sampling_params, cls.defaults)

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("the diffusion sampler never applies logits processors")


def validator_name(defaults: DenoisingDefaults) -> str:
    """Fully qualified name vLLM loads the validator class by."""
    return f"{__name__}:{_PREFIX}{defaults.encode()}"


def _validator_class(token: str) -> type[_DenoisingRequestValidator]:
    defaults = DenoisingDefaults.decode(token)
    return type(
        _PREFIX + token,
        (_DenoisingRequestValidator,),
        {"defaults": defaults, "__module__": __name__},
    )


__getattr__ = classes_by_name(__name__, {_PREFIX: _validator_class})
