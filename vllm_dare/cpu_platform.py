"""vLLM's CPU platform, refusing ``--attention-backend dare`` for models DARE cannot
serve.

vLLM's CPU platform picks its own attention backend whatever was asked for, so a
non-dLLM model started with ``--attention-backend dare`` would silently run without
DARE. vllm-dare's own models (LLaDA, Dream) take the DARE backend class directly
and clear the engine-wide selection at start-up, so a selection that still says
DARE when the platform is asked for a backend comes from another model: that is an
error, with the reason. Everything else is ``CpuPlatform`` unchanged. Activated by
the ``dare_cpu_triton`` platform plugin on the CPU build only.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

DARE_ONLY_DLLMS = (
    "--attention-backend dare: the DARE backend (vllm-dare) serves LLaDA and Dream "
    "checkpoints only (architectures LLaDAModelLM, DreamModel); this model uses "
    "vLLM's own attention backends, so start it without --attention-backend dare"
)


class DareCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and getattr(selected_backend, "name", None) == "DARE":
            raise ValueError(DARE_ONLY_DLLMS)
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
