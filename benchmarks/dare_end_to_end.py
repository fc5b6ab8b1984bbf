"""End-to-end generation time of the DARE backend vs. the exact path.

Runs one prompt batch through (1) the exact engine (vLLM's own attention backend),
(2) the DARE backend with nothing reused (mode off) and (3) the DARE backend at each
threshold (per-request overrides on one engine), and reports wall time, its ratio to
exact measured in the same run, reuse fractions and token agreement with exact.
Both engines live in this process at once and the settings are timed round-robin
(one generate call of each per round, ``--reps`` rounds); a setting's time is its
median and its speed-up the median of its per-round ratios to exact, so that drift
in the machine's speed hits every setting alike. Prints a table and writes JSON
with every setting.

    .venv/bin/python benchmarks/dare_end_to_end.py --model PATH
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, per engine (two live)
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from vllm_dare.tools.cli_args import HelpFormatter, number_in, positive_int  # noqa: E402


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    from vllm_dare.default_model import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=default_model_path(), help="checkpoint folder")
    parser.add_argument("--batch", type=positive_int, default=8, help="requests per generate call")
    parser.add_argument("--prompt-len", type=positive_int, default=64, help="prompt tokens per request")
    parser.add_argument("--gen-length", type=positive_int, default=64, help="generated tokens (max_tokens)")
    parser.add_argument("--block-length", type=positive_int, default=32, help="LLaDA block length")
    parser.add_argument("--steps", type=positive_int, default=64, help="denoising steps")
    parser.add_argument("--taus", type=number_in(0.0), nargs="+", default=[0.01, 0.05, 0.1, 0.2], help="DARE thresholds (tau_kv = tau_o)")
    parser.add_argument("--mode", default="kv+o", choices=["kv", "o", "kv+o"], help="what DARE reuses")
    parser.add_argument("--reps", type=positive_int, default=3, help="timing rounds")
    parser.add_argument("--out", default="benchmarks/results/dare_end_to_end_cpu.json", help="JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")

    common = dict(model=args.model, dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=args.prompt_len + args.gen_length + 8,
                  max_num_seqs=args.batch,
                  # two engines live at once: each may take less than half a GPU
                  # (the CPU build sizes its KV cache by VLLM_CPU_KVCACHE_SPACE)
                  gpu_memory_utilization=0.4)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    knobs = {"dllm_steps": args.steps, "dllm_block_length": args.block_length}

    def params(extra=None):
        return SamplingParams(max_tokens=args.gen_length, ignore_eos=True,
                              extra_args={**knobs, **(extra or {})})

    exact_llm = LLM(**common)
    dare_llm = LLM(**common, attention_backend="dare",
                   additional_config={"dare": {"mode": args.mode, "tau_kv": 0.0, "tau_o": 0.0}})
    tok = exact_llm.get_tokenizer()
    ids = tok.encode(text)[: args.prompt_len]
    prompts = [{"prompt_token_ids": ids[i:] + ids[:i]} for i in range(args.batch)]
    # (label, engine, params); tau 0 is the DARE backend in mode off.
    settings = [("exact", exact_llm, params())] + [
        (tau, dare_llm, params({"dare_tau_kv": tau, "dare_tau_o": tau} if tau
                               else {"dare_mode": "off"}))
        for tau in [0.0] + args.taus
    ]
    for _, llm, p in settings:
        llm.generate(prompts[:1], p, use_tqdm=False)  # warm-up
    seconds = {label: [] for label, _, _ in settings}
    outputs = {}
    for _ in range(args.reps):
        for label, llm, p in settings:
            start = time.perf_counter()
            outputs[label] = llm.generate(prompts, p, use_tqdm=False)
            seconds[label].append(time.perf_counter() - start)
    exact = outputs["exact"]
    t_exact = statistics.median(seconds["exact"])
    rows = []
    for tau in [0.0] + args.taus:
        outs = outputs[tau]
        same = sum(
            a == b for r, o in zip(exact, outs)
            for a, b in zip(r.outputs[0].token_ids, o.outputs[0].token_ids)
        )
        total = sum(len(r.outputs[0].token_ids) for r in exact)
        tl = sum(o.kv_transfer_params["dare"]["token_layers"] for o in outs)
        kv = sum(o.kv_transfer_params["dare"]["kv_reused"] for o in outs)
        ov = sum(o.kv_transfer_params["dare"]["o_reused"] for o in outs)
        ratios = [e / d for e, d in zip(seconds["exact"], seconds[tau])]
        rows.append({"tau": tau, "seconds": statistics.median(seconds[tau]),
                     "exact_seconds": t_exact,
                     "speedup_vs_exact": statistics.median(ratios),
                     "round_seconds": seconds[tau], "exact_round_seconds": seconds["exact"],
                     "kv_reuse": kv / tl, "o_reuse": ov / tl, "token_agreement": same / total})
    del exact_llm, dare_llm
    gc.collect()
    cleanup_dist_env_and_memory()
    model_name = Path(args.model).name  # no machine paths in the report
    config = json.loads((Path(args.model) / "config.json").read_text())
    size_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                 "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size")
    model_size = {k: config[k] for k in size_keys if k in config}
    report = {
        "benchmark": "dare_end_to_end", "model": model_name, "model_size": model_size,
        "mode": args.mode,
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_length": args.gen_length,
        "block_length": args.block_length, "steps": args.steps, "reps": args.reps,
        "timing": "round-robin, one call of each setting per round; median seconds, "
                  "median of per-round ratios to exact",
        "device": f"CPU {platform.machine()} (vLLM CPU build)", "rows": rows,
    }
    print(f"DARE end to end: {model_name} {model_size}, batch {args.batch}, prompt {args.prompt_len}, "
          f"gen {args.gen_length}, block {args.block_length}, steps {args.steps}, "
          f"mode {args.mode}, {report['device']}; exact {t_exact:.2f}s (median of "
          f"{args.reps} round-robin rounds)")
    print(f"{'tau':>6} {'seconds':>8} {'vs exact':>9} {'kv reuse':>9} {'o reuse':>8} {'agree':>6}")
    for r in rows:
        print(f"{r['tau']:>6.2f} {r['seconds']:>8.2f} {r['speedup_vs_exact']:>8.2f}x "
              f"{r['kv_reuse']:>9.3f} {r['o_reuse']:>8.3f} {r['token_agreement']:>6.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
