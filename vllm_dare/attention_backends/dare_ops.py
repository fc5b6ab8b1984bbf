"""The DARE kernels the backend runs on this device.

CUDA (and other devices with a Triton backend): the Triton kernels of
``triton_dare_kernels``. CPU: the vectorised PyTorch ops of ``torch_dare_ops``
(Triton has no CPU backend; its interpreter is only for tests). Set
``VLLM_DARE_KERNELS=triton`` or ``=torch`` to force one.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch


def dare_ops(device: torch.device) -> ModuleType:
    choice = os.environ.get("VLLM_DARE_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"VLLM_DARE_KERNELS must be auto, triton or torch, got {choice!r}")
    if choice == "triton" or (choice == "auto" and torch.device(device).type == "cuda"):
        from vllm_dare.attention_backends import triton_dare_kernels

        return triton_dare_kernels
    from vllm_dare.attention_backends import torch_dare_ops

    return torch_dare_ops
