"""Per-layer attention time of DARE vs. the exact path at forced reuse rates.

One bidirectional attention layer (Q/K/V projections, attention, output projection)
over a batch of requests, with LLaDA-8B or Dream-7B shapes and random weights:

* exact   -- fused QKV projection of every token, attention of every row
             (PyTorch SDPA, non-causal), output projection;
* DARE r  -- the engine's layer step (``dare_attention.dare_attention_step``):
             query projection of every token, query delta against Q_ref (from the
             paged cache), K/V projection + cache write of the (1-r) recomputed
             tokens, attention and output projection of the (1-r) recomputed rows,
             cached (projected) O for the reused rows. A fraction r of the tokens is
             reused for both K/V and O (chosen at random).

Prints a table and writes JSON with every setting. Runs on the GPU (Triton kernels)
when one is present, else on CPU (vectorised PyTorch ops).

    .venv/bin/python benchmarks/dare_attention.py --shape llada-8b --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_dare.attention_backends.dare_attention import (
    DareRuntime,
    DareStepInputs,
    dare_attention_step,
)
from vllm_dare.attention_backends.dare_backend import DareMetadata
from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_ops import dare_ops

SHAPES = {
    "llada-8b": dict(hidden=4096, heads=32, kv_heads=32, head_dim=128),
    "dream-7b": dict(hidden=3584, heads=28, kv_heads=4, head_dim=128),
    "tiny": dict(hidden=128, heads=4, kv_heads=4, head_dim=32),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    s = SHAPES[args.shape]
    H, Hkv, D, hidden = s["heads"], s["kv_heads"], s["head_dim"], s["hidden"]
    layout = DareCacheLayout(H, Hkv, D)
    ops = dare_ops(device)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    R, L, bs = args.batch, args.seq_len, args.block_size
    T = R * L
    w_qkv = rand((H + 2 * Hkv) * D, hidden, scale=hidden**-0.5)
    w_q, w_kv = w_qkv[: H * D], w_qkv[H * D :]
    w_o = rand(hidden, H * D, scale=(H * D) ** -0.5)
    x = rand(T, hidden)
    blocks_per_req = (L + bs - 1) // bs
    block_table = torch.arange(R * blocks_per_req, dtype=torch.int32, device=device).view(R, -1)
    pos = torch.arange(L, device=device)
    slot_mapping = torch.cat([block_table[r, pos // bs].long() * bs + pos % bs for r in range(R)])
    token_req = torch.arange(R, device=device, dtype=torch.int32).repeat_interleave(L)
    seq_lens = torch.full((R,), L, dtype=torch.int32, device=device)
    cache = rand(R * blocks_per_req * bs, layout.width)
    scale = D**-0.5
    meta = DareMetadata(
        num_actual_tokens=T, num_reqs=R, query_start_loc=torch.arange(R + 1, device=device) * L,
        seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping,
        token_req=token_req, causal=False,
    )

    def exact():
        q, k, v = (x @ w_qkv.T).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(R, L, H, D).transpose(1, 2)
        k = k.view(R, L, Hkv, D).transpose(1, 2)
        v = v.view(R, L, Hkv, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=Hkv != H)
        return o.transpose(1, 2).reshape(T, H * D) @ w_o.T

    def dare(reuse_rows: torch.Tensor):
        # The engine's own layer step (``dare_attention_step``). The reuse pattern
        # is set through its inputs: the recomputed tokens are forced, the reused
        # ones have Q_ref == q (query delta 0 <= tau), so the predictor runs as in
        # serving and picks exactly ``reuse_rows``.
        force = torch.ones(T, dtype=torch.bool, device=device)
        force[reuse_rows] = False
        tau = torch.full((T,), 0.05, device=device)
        runtime = DareRuntime(1, per_head=False, device=device)
        runtime.begin_step(DareStepInputs(force=force, tau_kv=tau, tau_o=tau,
                                          kv_is_reference=torch.ones_like(force), any_reuse=True), R)
        ops.write_rows(x @ w_q.T, torch.arange(T, dtype=torch.int32, device=device),
                       slot_mapping, cache, layout.qref_offset)

        def project_kv(rows):
            k, v = (x[rows] @ w_kv.T).split([Hkv * D, Hkv * D], dim=-1)
            return k, v

        def step():
            q = x @ w_q.T
            return dare_attention_step(meta, cache, bs, 0, runtime, layout, scale, q,
                                       project_kv, lambda o: o @ w_o.T)

        return step, runtime

    results = []
    t_exact = _time(exact, device, args.reps)
    for rate in args.reuse:
        n = int(round(rate * T))
        reuse_rows = torch.randperm(T, generator=g)[:n].to(device)
        step, runtime = dare(reuse_rows)
        t = _time(step, device, args.reps)
        counts = runtime.layer_counts[0].tolist()  # tokens, K/V reused, O reused (summed)
        results.append({"reuse": rate, "dare_ms": t * 1e3, "exact_ms": t_exact * 1e3,
                        "speedup_vs_exact": t_exact / t,
                        "measured_kv_reuse": counts[1] / counts[0],
                        "measured_o_reuse": counts[2] / counts[0]})
    return {
        "benchmark": "dare_attention_layer",
        "shape": args.shape, **s, "batch": R, "seq_len": L, "tokens": T,
        "block_size": bs, "dtype": args.dtype, "reps": args.reps,
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)",
        "kernels": ops.__name__.rsplit(".", 1)[-1],
        "exact_ms": t_exact * 1e3,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llada-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reuse", type=float, nargs="+", default=[0.0, 0.5, 0.87, 0.95])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = run(args)
    print(f"DARE attention layer, {report['shape']} (hidden {report['hidden']}, heads "
          f"{report['heads']}/{report['kv_heads']}, head_dim {report['head_dim']}), "
          f"batch {report['batch']} x seq {report['seq_len']}, block {report['block_size']}, "
          f"{report['dtype']}, {report['device']}, kernels: {report['kernels']}")
    print(f"{'reuse':>6} {'exact ms':>10} {'DARE ms':>10} {'speed-up':>9}")
    for r in report["results"]:
        print(f"{r['reuse']:>6.2f} {r['exact_ms']:>10.2f} {r['dare_ms']:>10.2f} "
              f"{r['speedup_vs_exact']:>8.2f}x")
    out = Path(args.out or f"benchmarks/results/dare_attention_{report['shape']}_"
               f"{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
