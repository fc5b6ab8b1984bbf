"""The DARE Triton kernels compile for an A100 (sm_80) and an H100 (sm_90) with
Triton's real GPU compiler, on this machine, GPU or not: the interpreter the other
kernel tests use on CPU accepts code the compiler rejects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_dare.attention_backends import triton_dare_kernels

HELPER = Path(__file__).with_name("gpu_kernel_compile.py")


def _compile(tmp_path, arch: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile, don't reuse
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, str(HELPER), "--arch", str(arch)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("arch", [80, 90])  # A100, H100/H200
def test_every_kernel_compiles_for_the_gpu(tmp_path, arch):
    result = _compile(tmp_path, arch)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    kernels = {name for name in dir(triton_dare_kernels)
               if name.startswith("_") and name.endswith("_kernel")}
    assert len(kernels) == 6, kernels
    for name in kernels:  # every kernel of the module, most in several variants
        least = 1 if name == "_select_rows_kernel" else 3
        assert result.stdout.count(f"ok sm_{arch} {name} ") >= least, (name, result.stdout)
    assert "FAILED" not in result.stdout
