#!/usr/bin/env bash
# The checks that need a CUDA GPU, for a machine with one: the DARE kernel and
# layer-step tests on the GPU (compiled Triton kernels against their PyTorch twins
# and dense attention), the tile sweeps of project_rows (vs cuBLAS) and paged_attention_rows (vs SDPA), then
# benchmarks/dare_attention.py in bf16 at LLaDA-8B and Dream-7B shapes: one
# attention layer, and the full decoder stack (32 / 28 layers with their MLPs),
# each launched eagerly (as vLLM runs a diffusion step) and replayed from a CUDA
# graph (the GPU's own time). Needs torch, triton, pytest and safetensors; not vLLM
# (the package is used from the source tree). Run from the repository root:
#
#     bash benchmarks/gpu_suite.sh [OUT_DIR] [PHASE...]
#
# PHASEs (default all): tests tiles attention decoder profile; SIZES (default
# "1x256 8x512 4x2048", requests x tokens) and LAUNCHES (default "eager graph")
# narrow the benchmarks. Writes
# gpu_tests.log, benchmarks.log (tables and profiles), tiles_*.json and
# one JSON per setting into OUT_DIR (default benchmarks/results/gpu).
set -uo pipefail
out=${1:-benchmarks/results/gpu}
shift || true
phases=${*:-tests tiles attention decoder profile}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
has() { [[ " $phases " == *" $1 "* ]]; }
if has tests; then
  python3 -m pytest -q -p no:cacheprovider tests/test_dare_kernels.py tests/test_dare_layer_step.py \
      2>&1 | tee "$out/gpu_tests.log" | tail -n 15
fi
if has tiles; then
  for kernel in project_rows attention; do
    python3 benchmarks/kernel_tiles.py --kernel $kernel --out "$out/tiles_$kernel.json" \
        2>&1 | tee "$out/tiles_$kernel.log" | tail -n 40
  done
fi
bench() {  # name, args...
  local name=$1; shift
  python3 benchmarks/dare_attention.py --dtype bfloat16 --reps 20 --block-size 16 \
    --out "$out/$name.json" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v '^wrote' "$out/$name.log" | grep -v -- '---\|Self\|Name\|^ \+\(aten\|void\|_\|Memcpy\|Memset\|cuda\|at::\)' \
    | head -n 12
  cat "$out/$name.log" >>"$out/benchmarks.log"; rm "$out/$name.log"
  return $rc
}
for shape in llada-8b dream-7b; do
  layers=32; [ "$shape" = dream-7b ] && layers=28
  for bl in ${SIZES:-1x256 8x512 4x2048}; do
    set -- ${bl/x/ }
    for launch in ${LAUNCHES:-eager graph}; do
      flag=; [ $launch = graph ] && flag=--cuda-graph
      has attention && bench "attention_${shape}_b$1x$2_$launch" --shape "$shape" \
        --batch "$1" --seq-len "$2" $flag
      has decoder && bench "decoder_${shape}_b$1x$2_$launch" --shape "$shape" --scope decoder \
        --layers "$layers" --batch "$1" --seq-len "$2" --reps 10 $flag
    done
  done
done
if has profile; then
  bench profile_attention_llada-8b_b8x512 --shape llada-8b --batch 8 --seq-len 512 \
    --reuse 0 0.87 --profile >/dev/null
fi
