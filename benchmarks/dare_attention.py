"""Attention-layer (or decoder-stack) time of DARE vs. the exact path at forced reuse
rates.

Random weights with LLaDA-8B or Dream-7B shapes, a batch of requests in a paged
cache, and one of two scopes:

* ``--scope attention`` (default): one attention layer (Q/K/V projections,
  attention, output projection);
* ``--scope decoder --layers N``: N full pre-norm decoder layers (RMSNorm, attention,
  residual, RMSNorm, SwiGLU MLP, residual), i.e. one denoising forward without the
  embedding and LM head. DARE never skips the MLP, so this bounds what DARE can
  buy end to end. RoPE is left out of both sides.

Timed per setting (same run, same inputs; the settings are timed round-robin, one
call of each per round, and a speed-up is the median of its per-round ratios, so
that drift in the machine's speed hits every setting alike):

* exact     -- fused QKV projection of every token, PyTorch SDPA (non-causal),
               output projection;
* engine off -- the engine's layer step in DARE mode off (what the DARE backend
               runs in exact mode: K/V of every token written to the paged cache, no
               predictor, no Q_ref or O writes). Every request's query is its whole
               sequence (a denoising step over whole canvases), so a step that
               recomputes every row attends on its own K/V (``dense_attention``:
               SDPA), not through the paged cache;
* DARE r    -- the engine's layer step (``dare_layer_step.dare_attention_step``):
               query projection of every token, query delta against Q_ref (from the
               paged cache), K/V projection + cache write of the (1-r) recomputed
               tokens, attention and output projection of the (1-r) recomputed rows,
               cached (projected) O for the reused rows. A random fraction r of the
               tokens is not forced and has tau above any query delta, so the
               predictor runs as in serving and reuses exactly those (K/V and O).
               At r = 0 every token is forced, which the host knows (a refresh
               step): every row is projected by the model's matmuls.
* DARE 0 (predicted) -- nothing forced, tau below every query delta: the
               predictor finds nothing reusable, and every row goes through the
               row-selecting path (row lists on the device, ``project_rows``).
               Its input is the others' scaled by 1.5 and its Q_ref rows are not
               rewritten, so that every repetition's predictor finds every query
               changed (one row write less than a serving step).

Prints a table and writes JSON with every setting. Runs on the GPU (Triton kernels)
when one is present, else on CPU (vectorised PyTorch ops). ``--profile`` prints the
busiest ops of one DARE forward at each reuse rate (torch profiler). By default each
call is launched eagerly from Python, as vLLM runs a diffusion step; on a GPU,
``--cuda-graph`` times replays of each setting captured in a CUDA graph instead: the
GPU's own time, without the host's launch overhead (a DARE step that selects rows
never syncs with the host, so it can be captured).

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

from vllm_dare.attention_backends.dare_cache_layout import DareCacheLayout
from vllm_dare.attention_backends.dare_layer_step import (
    DareProjections,
    DareRuntime,
    DareStepInputs,
    dare_attention_step,
)
from vllm_dare.attention_backends.dare_metadata import DareMetadata
from vllm_dare.attention_backends.dare_ops import dare_ops

SHAPES = {
    "llada-8b": dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=12288,
                     num_layers=32),
    "dream-7b": dict(hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                     num_layers=28),
    "tiny": dict(hidden=128, heads=4, kv_heads=4, head_dim=32, intermediate=384, num_layers=2),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_interleaved(fns: dict, device, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin (one call of each per
    round) so that drift in the machine's speed hits every setting alike."""
    for fn in fns.values():
        fn()
        _sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


class Stack:
    """Random layers of one shape and a paged batch (every request ``seq_len`` long)."""

    def __init__(self, args, device, dtype):
        s = SHAPES[args.shape]
        self.H, self.Hkv = s["heads"], s["kv_heads"]
        self.D, self.hidden = s["head_dim"], s["hidden"]
        H, Hkv, D, hidden = self.H, self.Hkv, self.D, self.hidden
        self.mlp = args.scope == "decoder"
        self.num_layers = args.layers
        self.layout = DareCacheLayout(H, Hkv, D)
        self.device, self.dtype = device, dtype
        self.g = torch.Generator().manual_seed(0)  # reuse patterns
        g = torch.Generator(device=device).manual_seed(0)  # weights, inputs, caches

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

        inter = s["intermediate"]
        self.layers = []
        for _ in range(self.num_layers):
            w = {"qkv": rand((H + 2 * Hkv) * D, hidden, scale=hidden**-0.5),
                 "o": rand(hidden, H * D, scale=(H * D) ** -0.5)}
            if self.mlp:
                w["gate_up"] = rand(2 * inter, hidden, scale=hidden**-0.5)
                w["down"] = rand(hidden, inter, scale=inter**-0.5)
                w["norm1"] = torch.ones(hidden, device=device, dtype=dtype)
                w["norm2"] = torch.ones(hidden, device=device, dtype=dtype)
            w["q"], w["kv"] = w["qkv"][: H * D], w["qkv"][H * D :]
            self.layers.append(w)
        R, L, bs = args.batch, args.seq_len, args.block_size
        self.R, self.L, self.bs, self.T = R, L, bs, R * L
        self.x = rand(self.T, hidden)
        blocks_per_req = (L + bs - 1) // bs
        block_table = torch.arange(R * blocks_per_req, dtype=torch.int32,
                                   device=device).view(R, -1)
        pos = torch.arange(L, device=device)
        slot_mapping = torch.cat([block_table[r, pos // bs].long() * bs + pos % bs
                                  for r in range(R)])
        self.caches = [rand(R * blocks_per_req * bs, self.layout.width)
                       for _ in range(self.num_layers)]
        self.meta = DareMetadata(
            num_actual_tokens=self.T, num_reqs=R,
            query_start_loc=torch.arange(R + 1, device=device) * L,
            seq_lens=torch.full((R,), L, dtype=torch.int32, device=device),
            block_table=block_table, slot_mapping=slot_mapping,
            token_req=torch.arange(R, device=device, dtype=torch.int32).repeat_interleave(L),
            causal=False, max_query_len=L, full_sequence_len=L,
        )
        self.scale = D**-0.5

    def _mlp(self, x, w):
        gate, up = (F.rms_norm(x, (self.hidden,), w["norm2"]) @ w["gate_up"].T).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ w["down"].T

    def exact(self):
        H, Hkv, D, R, L, T = self.H, self.Hkv, self.D, self.R, self.L, self.T
        x = self.x
        for w in self.layers:
            h = F.rms_norm(x, (self.hidden,), w["norm1"]) if self.mlp else x
            q, k, v = (h @ w["qkv"].T).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.view(R, L, H, D).transpose(1, 2)
            k = k.view(R, L, Hkv, D).transpose(1, 2)
            v = v.view(R, L, Hkv, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=Hkv != H)
            attn = o.transpose(1, 2).reshape(T, H * D) @ w["o"].T
            x = self._mlp(x + attn, w) if self.mlp else attn
        return x

    def dare(self, runtime: DareRuntime, x: torch.Tensor | None = None):
        Hkv, D = self.Hkv, self.D
        x = self.x if x is None else x
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), w["norm1"]) if self.mlp else x

            def project_kv(rows, h=h, w=w):  # rows: row ids or slice(0, T)
                k, v = (h[rows] @ w["kv"].T).split([Hkv * D, Hkv * D], dim=-1)
                return k, v

            proj = DareProjections(project_kv, lambda o, w=w: o @ w["o"].T, h, w["kv"], None,
                                   w["o"])
            attn = dare_attention_step(self.meta, self.caches[i], self.bs, i, runtime,
                                       self.layout, self.scale, h @ w["q"].T, proj)
            x = self._mlp(x + attn, w) if self.mlp else attn
        return x

    def runtime(self, reuse_rows: torch.Tensor | None, predicted_none: bool = False
                ) -> DareRuntime:
        """A runtime whose step reuses exactly ``reuse_rows`` (None: DARE mode off for
        every request, as the engine runs it: no predictor, no Q_ref or O writes;
        ``predicted_none``: nothing forced, and a threshold no query delta is under)."""
        runtime = DareRuntime(self.num_layers, per_head=False, device=self.device)
        force = torch.ones(self.T, dtype=torch.bool, device=self.device)
        if reuse_rows is None:
            never = torch.zeros(self.T, device=self.device)
            runtime.begin_step(DareStepInputs(force=force, tau_kv=never, tau_o=never,
                                              kv_is_reference=torch.ones_like(force),
                                              any_reuse=False, keeps_reference=False,
                                              keeps_o=False), self.R)
            return runtime
        force[reuse_rows] = False
        tau = torch.full((self.T,), 1e30, device=self.device)
        if predicted_none:
            force[:] = False
            tau.fill_(1e-30)
        runtime.begin_step(DareStepInputs(force=force, tau_kv=tau, tau_o=tau,
                                          kv_is_reference=torch.ones_like(force),
                                          any_reuse=True, keeps_reference=not predicted_none),
                           self.R)
        return runtime


def _graphed(fn):
    """``fn`` captured once in a CUDA graph: its replay (the GPU's time for the work,
    without the host's launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _profile(fn, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)


PREDICTED_NONE = "0 (predicted)"


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    stack = Stack(args, device, dtype)
    ops = dare_ops(device)
    off = stack.runtime(None)
    runtimes = {}
    for rate in args.reuse:
        n = int(round(rate * stack.T))
        runtimes[rate] = stack.runtime(torch.randperm(stack.T, generator=stack.g)[:n].to(device))
    runtimes[PREDICTED_NONE] = stack.runtime(torch.zeros(0, dtype=torch.long, device=device),
                                             predicted_none=True)
    fns = {"exact": stack.exact, "off": lambda: stack.dare(off)}
    fns.update({rate: (lambda rt=rt: stack.dare(rt)) for rate, rt in runtimes.items()})
    shifted = stack.x * 1.5
    fns[PREDICTED_NONE] = lambda: stack.dare(runtimes[PREDICTED_NONE], shifted)
    # What each setting reuses, from one eager forward (graph replays do not count).
    reused = {}
    for rate, runtime in runtimes.items():
        fns[rate]()
        reused[rate] = runtime.layer_counts.sum(0).tolist()  # tokens, K/V, O reused
    timed = {name: _graphed(fn) for name, fn in fns.items()} if args.cuda_graph else fns
    times = _time_interleaved(timed, device, args.reps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    t_exact, t_off = med["exact"], med["off"]

    def paired(base: str, name) -> float:
        """Median over rounds of base time / this setting's time in the same round."""
        return statistics.median(b / t for b, t in zip(times[base], times[name]))

    results = []
    for rate in runtimes:
        counts = reused[rate]
        results.append({"reuse": 0.0 if rate == PREDICTED_NONE else rate,
                        "setting": str(rate), "dare_ms": med[rate] * 1e3, "exact_ms": t_exact * 1e3,
                        "speedup_vs_exact": paired("exact", rate),
                        "speedup_vs_engine_off": paired("off", rate),
                        "speedup_vs_exact_of_medians": t_exact / med[rate],
                        "measured_kv_reuse": counts[1] / counts[0],
                        "measured_o_reuse": counts[2] / counts[0]})
        if args.profile:
            print(f"--- profile, reuse {rate}")
            print(_profile(fns[rate], device))
    s = SHAPES[args.shape]
    return {
        "benchmark": "dare_attention_layer" if args.scope == "attention" else "dare_decoder_stack",
        "scope": args.scope, "layers": args.layers,
        "shape": args.shape, **{k: v for k, v in s.items() if k != "num_layers"},
        "batch": stack.R, "seq_len": stack.L, "tokens": stack.T,
        "block_size": stack.bs, "dtype": args.dtype, "reps": args.reps,
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "kernels": ops.__name__.rsplit(".", 1)[-1],
        "exact_ms": t_exact * 1e3,
        "engine_off_ms": t_off * 1e3,
        "engine_off_speedup_vs_exact": paired("exact", "off"),
        "launch": "cuda_graph" if args.cuda_graph else "eager",
        "timing": "every setting timed round-robin, reps rounds; ms are medians; "
                  "speed-ups are medians of the per-round ratios",
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llada-8b")
    parser.add_argument("--scope", choices=["attention", "decoder"], default="attention")
    parser.add_argument("--layers", type=int, default=1,
                        help="number of layers (decoder scope; the model has "
                             "32 for llada-8b, 28 for dream-7b)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reuse", type=float, nargs="+", default=[0.0, 0.5, 0.87, 0.95])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time replays of each setting captured in a CUDA graph (the "
                             "GPU's time, no launch overhead; vLLM runs diffusion steps "
                             "eagerly, so eager timing is what serving sees)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = run(args)
    what = ("attention layer" if args.scope == "attention"
            else f"{args.layers} decoder layers (attention + SwiGLU MLP)")
    print(f"DARE {what}, {report['shape']} (hidden {report['hidden']}, heads "
          f"{report['heads']}/{report['kv_heads']}, head_dim {report['head_dim']}), "
          f"batch {report['batch']} x seq {report['seq_len']}, block {report['block_size']}, "
          f"{report['dtype']}, {report['device']}, kernels: {report['kernels']}, "
          f"launched {report['launch'].replace('_', ' ')}")
    print(f"exact (SDPA) {report['exact_ms']:.2f} ms; engine step with nothing reused "
          f"{report['engine_off_ms']:.2f} ms "
          f"({report['engine_off_speedup_vs_exact']:.2f}x; speed-ups are medians of "
          f"per-round ratios, settings timed round-robin)")
    print(f"{'reuse':>14} {'exact ms':>10} {'DARE ms':>10} {'vs exact':>9} {'vs off':>8}")
    for r in report["results"]:
        print(f"{r['setting']:>14} {r['exact_ms']:>10.2f} {r['dare_ms']:>10.2f} "
              f"{r['speedup_vs_exact']:>8.2f}x {r['speedup_vs_engine_off']:>7.2f}x")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scope = "" if args.scope == "attention" else f"_decoder{args.layers}"
    scope += "_graph" if args.cuda_graph else ""
    out = Path(args.out or f"benchmarks/results/dare_attention_{report['shape']}{scope}_"
               f"{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
