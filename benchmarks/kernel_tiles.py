"""Tile sweep of DARE's two matmul kernels on a CUDA GPU, against what exact mode
runs: ``project_rows`` (the gathered projection of the rows DARE recomputes) vs
cuBLAS, and ``paged_attention_rows`` (attention of the selected rows over the paged
cache) vs PyTorch SDPA.

``--kernel project_rows``: the K/V projection (RoPE on the keys, into cache slots;
Dream's with its bias) and the output projection (into the layer output and the O
slots) at LLaDA-8B and Dream-7B shapes, for T tokens of which a fraction is listed.
Baselines: ``dense`` = ``x @ W.T`` over all T rows (exact mode); ``gather`` =
``x[rows[:n]] @ W.T`` with n known on the host (a step that syncs for the count),
the gather included, the scatter into the cache not.

``--kernel attention``: LLaDA-8B (32/32 heads) and Dream-7B (28/4) layouts, a batch
of requests in a paged cache (block 16, blocks shuffled), a fraction of each
request's rows selected. Baseline: SDPA over the same queries, keys and values as
dense tensors, every row (exact mode).

Every configuration's result is first checked against the default configuration's
(equal to rounding). Timing: ``triton.testing.do_bench``, median. Prints per case
the default's time, the best configuration and the baselines, then the
configurations with the best geometric mean over all cases; writes JSON with every
timing.

    python benchmarks/kernel_tiles.py --kernel attention --out attention_tiles.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

HEAD_DIM = 128
PROJECTIONS = {  # (in_features, out_features, bias, rope, output)
    "llada-8b kv": (4096, 2 * 32 * 128, False, True, "cache"),
    "llada-8b o": (4096, 4096, False, False, "out+cache"),
    "dream-7b kv": (3584, 2 * 4 * 128, True, True, "cache"),
    "dream-7b o": (3584, 3584, False, False, "out+cache"),
}
LAYOUTS = {"llada-8b": (32, 32), "dream-7b": (28, 4)}  # query heads, KV heads
BATCHES = [(1, 256), (8, 512), (4, 2048)]  # requests x tokens each
SWEEPS = {
    "project_rows": dict(BLOCK_M=[64, 128], BLOCK_K=[64], FULL_HEAD=[False, True],
                         num_warps=[4, 8], num_stages=[3, 4]),
    "attention": dict(BLOCK_M=[64, 128], BLOCK_N=[32, 64, 128], num_warps=[4, 8],
                      num_stages=[2, 3, 4]),
}


def _configs(kernel: str) -> list[dict]:
    sweep = SWEEPS[kernel]
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def _label(cfg: dict | None) -> str:
    if cfg is None:
        return "default"
    short = {"BLOCK_M": "m", "BLOCK_N": "n", "BLOCK_K": "k", "num_warps": "w", "num_stages": "s"}
    parts = [f"{short[k]}{v}" for k, v in cfg.items() if k in short]
    return " ".join(parts + (["full"] if cfg.get("FULL_HEAD") else []))


def _projection_cases(args, dev, g):
    from vllm_dare.attention_backends import triton_dare_kernels as k

    dtype = torch.bfloat16
    for (name, (n_in, n_out, has_bias, rope, output)), T, frac in itertools.product(
            PROJECTIONS.items(), args.tokens, args.fractions):
        n = max(1, round(frac * T))
        x = torch.randn(T, n_in, device=dev, dtype=dtype, generator=g)
        w = (torch.randn(n_out, n_in, device=dev, generator=g) * n_in**-0.5).to(dtype)
        bias = torch.randn(n_out, device=dev, generator=g).to(dtype) if has_bias else None
        rows = torch.randperm(T, device=dev, generator=g)[:n].sort().values
        rows = torch.cat([rows, torch.zeros(T - n, dtype=torch.long, device=dev)])
        count = torch.tensor([n], dtype=torch.int32, device=dev)
        slots = torch.randperm(T, device=dev, generator=g)
        width = 3 * n_out if output == "out+cache" else n_out
        cache = torch.empty(T, width, device=dev, dtype=dtype)
        out = torch.empty(T, n_out, device=dev, dtype=dtype)
        positions = torch.arange(T, device=dev) % 4096
        inv = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM)
        ang = torch.arange(4096, device=dev).float()[:, None] * inv[None, :]
        cos_sin = torch.cat([ang.cos(), ang.sin()], dim=1)

        def launch(cfg, dst_cache=cache, dst_out=out, x=x, w=w, bias=bias, rows=rows,
                   count=count, slots=slots, positions=positions, cos_sin=cos_sin,
                   n_out=n_out, output=output):
            if output == "cache":
                k.project_rows(x, w, bias, rows, count, HEAD_DIM, dst_cache, 0,
                               slot_mapping=slots, out_at_slot=True, positions=positions,
                               cos_sin_cache=cos_sin, rope_heads=n_out // 2 // HEAD_DIM,
                               tiles=cfg)
            else:
                k.project_rows(x, w, None, rows, count, HEAD_DIM, dst_out, slot_mapping=slots,
                               out2=dst_cache, out2_col=n_out, tiles=cfg)

        def written(cfg, launch=launch, cache=cache, out=out, slots=slots, rows=rows, n=n,
                    n_out=n_out, output=output):
            c, o = torch.full_like(cache, float("nan")), torch.full_like(out, float("nan"))
            launch(cfg, c, o)
            return (c[slots[rows[:n]], :n_out] if output == "cache" else o[rows[:n]]).float()

        baselines = {"dense_cublas": lambda x=x, w=w: x @ w.T,
                     "gather_cublas": lambda x=x, w=w, r=rows[:n]: x.index_select(0, r) @ w.T}
        yield (dict(case=name, tokens=T, fraction=frac, rows=n,
                    flops=2 * n * n_in * n_out), launch, written, baselines)


def _attention_cases(args, dev, g):
    from vllm_dare.attention_backends import triton_dare_kernels as k
    from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout

    dtype, bs = torch.bfloat16, 16
    for (name, (H, Hkv)), (R, L), frac in itertools.product(
            LAYOUTS.items(), BATCHES, args.fractions):
        layout = DareCacheLayout(H, Hkv, HEAD_DIM)
        T = R * L
        blocks = R * (L // bs)
        block_table = torch.randperm(blocks, device=dev, generator=g).to(torch.int32).view(R, -1)
        pos = torch.arange(L, device=dev)
        slots = torch.cat([block_table[r, pos // bs].long() * bs + pos % bs for r in range(R)])
        cache = torch.randn(blocks * bs, layout.width, device=dev, dtype=dtype, generator=g)
        q = torch.randn(T, H, HEAD_DIM, device=dev, dtype=dtype, generator=g)
        seq_lens = torch.full((R,), L, dtype=torch.int32, device=dev)
        per_req = max(1, round(frac * L))
        picked = [torch.randperm(L, device=dev, generator=g)[:per_req].sort().values + r * L
                  for r in range(R)]
        rows = torch.cat(picked)
        starts = torch.arange(R + 1, device=dev, dtype=torch.int32) * per_req
        out = torch.empty_like(q)
        scale = HEAD_DIM**-0.5

        def launch(cfg, dst=out, q=q, cache=cache, layout=layout, block_table=block_table,
                   seq_lens=seq_lens, rows=rows, starts=starts, per_req=per_req):
            k.paged_attention_rows(q, cache, layout, block_table, seq_lens, rows, None, dst,
                                   bs, scale, max_rows_per_req=per_req, req_row_start=starts,
                                   tiles=cfg)

        def written(cfg, launch=launch, out=out, rows=rows):
            o = torch.full_like(out, float("nan"))
            launch(cfg, o)
            return o[rows].float()

        kv = cache[slots]
        kd = kv[:, layout.k_offset: layout.k_offset + layout.kv_width]
        vd = kv[:, layout.v_offset: layout.v_offset + layout.kv_width]
        qd, kd, vd = (t.reshape(R, L, -1, HEAD_DIM).transpose(1, 2).contiguous()
                      for t in (q, kd, vd))
        baselines = {"sdpa": lambda qd=qd, kd=kd, vd=vd, gqa=H != Hkv:
                     F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=gqa)}
        yield (dict(case=name, batch=R, seq_len=L, fraction=frac, rows=R * per_req,
                    flops=4 * R * per_req * L * HEAD_DIM * H), launch, written, baselines)


def run(args) -> dict:
    import triton
    from triton.testing import do_bench

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    configs = _configs(args.kernel)
    cases = (_projection_cases if args.kernel == "project_rows" else _attention_cases)(args, dev, g)
    results = []
    for info, launch, written, baselines in cases:
        want = written(None)
        entry = {**info, **{f"{b}_ms": do_bench(fn, return_mode="median")
                            for b, fn in baselines.items()}, "configs": {}}
        for cfg in [None] + configs:
            label = _label(cfg)
            try:
                got = written(cfg)
                err = ((got - want).norm() / want.norm()).item()
                if not math.isfinite(err) or err > 1e-2:
                    entry["configs"][label] = {"error": f"wrong result, rel err {err:.3g}"}
                    continue
                ms = do_bench(lambda cfg=cfg: launch(cfg), return_mode="median")
                entry["configs"][label] = {"ms": ms, "tflops": info["flops"] / ms * 1e-9}
            except (triton.runtime.errors.OutOfResources, RuntimeError, ValueError) as e:
                entry["configs"][label] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        timed = {lab: c["ms"] for lab, c in entry["configs"].items() if "ms" in c}
        entry["best"] = best = min(timed, key=timed.get)
        results.append(entry)
        what = " ".join(f"{k} {info[k]}" for k in info if k not in ("flops", "fraction"))
        base = "  ".join(f"{b} {entry[f'{b}_ms']*1e3:7.1f}" for b in baselines)
        print(f"{what}: {base}  default {timed['default']*1e3:7.1f}  best "
              f"{timed[best]*1e3:7.1f} us ({best})", flush=True)
    # One configuration for all: the best geometric mean of time over the default's.
    score = {}
    for lab in map(_label, configs):
        ratios = [e["configs"][lab]["ms"] / e["configs"]["default"]["ms"] for e in results
                  if "ms" in e["configs"].get(lab, {})]
        if len(ratios) == len(results):
            score[lab] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    ranked = sorted(score, key=score.get)
    print("best overall (geometric mean of time / default's):")
    for lab in ranked[:8]:
        print(f"  {lab:24} {score[lab]:.3f}")
    return {"benchmark": f"kernel_tiles_{args.kernel}", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "dtype": "bfloat16",
            "timing": "triton.testing.do_bench, median ms", "results": results,
            "overall": {lab: score[lab] for lab in ranked}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=sorted(SWEEPS), required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 4096, 8192],
                        help="project_rows: tokens in the batch")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.13, 1.0],
                        help="fraction of the rows listed (recomputed)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_tiles.py needs a CUDA GPU")
    report = run(args)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
