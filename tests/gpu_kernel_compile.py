"""Compile every DARE Triton kernel for a CUDA GPU, on a machine without one.

Triton's interpreter (what the kernel tests run on CPU) accepts code its GPU
compiler rejects, so this runs each kernel through the real compiler (TTIR, TTGIR,
LLVM IR, PTX, and ``ptxas`` to a cubin; Triton's wheel ships all of them) for a
target architecture, with the compile-time parameters the launch wrappers would
use (``*_constexprs``) for the LLaDA-8B and Dream-7B layouts and each dtype.
Argument types are those the wrappers pass.

    TRITON_INTERPRET= python tests/gpu_kernel_compile.py [--arch 90]

Prints one line per kernel variant; exits non-zero if any fails to compile. Must
run without ``TRITON_INTERPRET`` (under it ``triton.jit`` makes interpreter
functions, which cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

# Shared memory one program may use (opt-in maximum per block): more and the launch
# fails with "out of resource", which only a compiled kernel reveals.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LAYOUTS = {"llada-8b": (32, 32, 128), "dream-7b": (28, 4, 128), "small": (4, 2, 64)}


def variants():
    """(kernel, signature of the runtime arguments, constexprs, label) to compile."""
    from vllm_dare.attention_backends import triton_dare_kernels as k
    from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout

    for name, (heads, kv_heads, head_dim) in LAYOUTS.items():
        layout = DareCacheLayout(heads, kv_heads, head_dim)
        for dtype, dt in DTYPES.items():
            for block_size, rows in [(16, 4096), (16, 256), (32, 8)]:  # each tile size
                if dtype == torch.float32 and (rows != 4096 or name != "dream-7b"):
                    continue  # the fp32 tile takes ~8 s to compile; one is enough
                yield (k._paged_attention_rows_kernel, dict(
                    q_ptr=f"*{dt}", q_stride_t="i32", q_stride_h="i32", cache_ptr=f"*{dt}",
                    cache_stride_slot="i32", block_table_ptr="*i32", block_table_stride="i32",
                    seq_lens_ptr="*i32", row_token_ptr="*i64", req_row_start_ptr="*i32",
                    out_ptr=f"*{dt}", out_stride_t="i32", out_stride_h="i32", scale="fp32"),
                    k.paged_attention_constexprs(layout, block_size, rows, dtype),
                    f"{name} {dt} block {block_size}")
            for by_token, counted in [(True, True), (False, False)]:
                yield (k._write_rows_kernel, dict(
                    src_ptr=f"*{dt}", src_stride="i32", rows_ptr="*i64", count_ptr="*i32",
                    slot_mapping_ptr="*i64", cache_ptr=f"*{dt}", cache_stride="i32",
                    col_offset="i32"),
                    k.write_rows_constexprs(layout.q_width, by_token, counted), f"{name} {dt}")
            if dtype != torch.float32 or name == "dream-7b":  # fp32 dots compile slowly
                # K/V projection into the cache (bias: Dream; RoPE table in fp32 or the
                # model dtype), output projection to the layer output and O slots;
                # the tiles for short and long row lists.
                for rows in (256, 4096):
                    for rope_dt, bias in [("fp32", name == "dream-7b"), (dt, False)]:
                        yield (k._project_rows_kernel, _project_args(dt, rope_dt, bias, False),
                               k.project_rows_constexprs(layout.q_width, head_dim, dtype,
                                                         kv_heads, bias, out_at_slot=True,
                                                         has_out2=False, rows=rows),
                               f"{name} {dt} K/V, rope {rope_dt}, {rows} rows")
                    yield (k._project_rows_kernel, _project_args(dt, dt, False, True),
                           k.project_rows_constexprs(layout.q_width, head_dim, dtype, 0, False,
                                                     out_at_slot=False, has_out2=True,
                                                     rows=rows),
                           f"{name} {dt} O, {rows} rows")
            yield (k._write_kv_rows_kernel, dict(
                k_ptr=f"*{dt}", k_stride="i32", v_ptr=f"*{dt}", v_stride="i32", rows_ptr="*i64",
                slot_mapping_ptr="*i64", cache_ptr=f"*{dt}", cache_stride="i32"),
                k.write_kv_rows_constexprs(layout), f"{name} {dt}")
            # As the layer step launches it (counting; gathering O where it may be
            # reused; Q_ref written where a request keeps it), and bare.
            for per_head, write_qref, count, gather_o in ((False, True, True, True),
                                                          (True, False, True, False),
                                                          (False, False, False, False)):
                yield (k._decide_reuse_kernel, dict(
                    q_ptr=f"*{dt}", q_stride="i32", slot_mapping_ptr="*i64", cache_ptr=f"*{dt}",
                    cache_stride="i32", tau_kv_ptr="*fp32", tau_o_ptr="*fp32", flags_ptr="*i8",
                    qref_follows_kv_ptr="*i8", reuse_counts_ptr="*i32" if count else "*i8",
                    o_out_ptr=f"*{dt}", o_out_stride="i32", eps="fp32"),
                    k.decide_reuse_constexprs(layout, per_head, write_qref, count, gather_o),
                    f"{name} {dt}")

    yield (k._select_rows_kernel, dict(
        flags_ptr="*i8", query_start_loc_ptr="*i32", num_reqs="i32",
        num_tokens="i32", rows_ptr="*i64", req_row_start_ptr="*i32", counts_ptr="*i32",
        totals_ptr="*i32", prefix_ptr="*i32"),
        k.select_rows_constexprs(), "any layout")


def _project_args(dt: str, rope_dt: str, bias: bool, out2: bool) -> dict:
    """Argument types of ``_project_rows_kernel`` as ``project_rows`` passes them
    (the row list stands in for pointers a variant never reads)."""
    return dict(
        x_ptr=f"*{dt}", x_stride="i32", w_ptr=f"*{dt}", w_stride="i32",
        bias_ptr=f"*{dt}" if bias else "*i64", rows_ptr="*i64", count_ptr="*i32",
        slot_mapping_ptr="*i64", positions_ptr="*i64", cos_sin_ptr=f"*{rope_dt}",
        cos_sin_stride="i32", out_ptr=f"*{dt}", out_stride="i32", out_col="i32",
        out2_ptr=f"*{dt}" if out2 else "*i64", out2_stride="i32", out2_col="i32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="CUDA compute capability (90: H100/H200)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for kernel, runtime_args, constexprs, label in variants():
        options = {name: constexprs.pop(name) for name in ("num_warps", "num_stages")
                   if name in constexprs}
        signature = {name: "constexpr" if name in constexprs else runtime_args[name]
                     for name in kernel.arg_names}
        what = f"{kernel.__name__} [{label}] {constexprs} {options}"
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                      options=options)
            cubin = compiled.asm["cubin"]
        except Exception:  # report every variant, then fail
            failures += 1
            print(f"FAILED {what}\n{traceback.format_exc()}")
            continue
        if compiled.metadata.shared > SHARED_LIMIT[args.arch]:
            failures += 1
            print(f"FAILED {what}: {compiled.metadata.shared} B of shared memory, more than "
                  f"sm_{args.arch}'s {SHARED_LIMIT[args.arch]} B")
            continue
        print(f"ok sm_{args.arch} {what}: {len(cubin)} byte cubin, "
              f"{compiled.metadata.shared} B shared, {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
