"""End-to-end generation time of each cache policy against exact mode.

One prompt batch through one engine, once per setting: exact (``dllm_cache`` none)
and each policy given (per-request knob), optionally also with DARE
(``POLICY+dare``: the DARE backend engine with ``dare_mode`` kv+o at ``--tau``).
The settings are timed round-robin (one ``generate`` call of each per round,
``--reps`` rounds); a setting's time is its median and its speed-up the median of
its per-round ratios to exact, so that drift in the machine's speed hits every
setting alike. Reports wall time, speed-up, token-layer rows computed relative to
exact (``computed_rows``), NFE and token agreement with exact. Prints a table and
writes JSON and a plot.

Without ``--model`` it builds a random LLaDA of about 100 M parameters (hidden 1024,
8 layers, 16 heads, MLP 2816, fp32), where a forward's matmuls outweigh the
per-step fixed costs:

    .venv/bin/python benchmarks/cache_policies_end_to_end.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, per engine (two may live)
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

DEFAULT_SETTINGS = ["prefix", "dual", "dkv_decode", "dual+dare"]


def build_mid_model(directory: Path) -> Path:
    from vllm_dare.tools.tiny_checkpoint import TinySize, write_checkpoint

    import torch

    size = TinySize(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816)
    return write_checkpoint(directory / "llada-mid-random", "llada", size, seed=0,
                            dtype=torch.float32)


def parse_setting(text: str) -> tuple[str, bool]:
    from vllm_dare.cache_policies import policies

    cache, _, dare = text.partition("+")
    if cache not in policies() or dare not in ("", "dare"):
        raise argparse.ArgumentTypeError(
            f"setting {text!r}: use POLICY or POLICY+dare with POLICY one of "
            f"{', '.join(policies())}")
    return cache, dare == "dare"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="LLaDA checkpoint folder (default: a random ~100M LLaDA)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help="POLICY or POLICY+dare (DARE kv+o at --tau on the fed tokens)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tau", type=float, default=0.05, help="DARE threshold of +dare")
    parser.add_argument("--reps", type=int, default=3, help="timing rounds")
    parser.add_argument("--out", default="benchmarks/results/cache_policies_end_to_end_cpu",
                        help="output prefix: PREFIX.json and PREFIX.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing results at --out")
    args = parser.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    out = Path(args.out)
    json_path = out.with_name(out.name + ".json")
    if json_path.exists() and not args.overwrite:
        parser.error(f"--out {json_path} exists; pass --overwrite to replace it")

    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    workdir = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else build_mid_model(Path(workdir.name))
    config = json.loads((model / "config.json").read_text())
    common = dict(model=str(model), dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=args.prompt_len + args.gen_length + 8,
                  max_num_seqs=args.batch, gpu_memory_utilization=0.4)
    engines = {"exact": LLM(**common)}
    if any(dare for _, dare in settings):
        engines["dare"] = LLM(**common, attention_backend="dare",
                              additional_config={"dare": {"mode": "kv+o", "tau_kv": args.tau,
                                                          "tau_o": args.tau}})
    tok = engines["exact"].get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tok.encode(text)[: args.prompt_len]
    prompts = [{"prompt_token_ids": ids[i:] + ids[:i]} for i in range(args.batch)]
    knobs = {"dllm_steps": args.steps, "dllm_block_length": args.block_length}
    runs = [("exact", "exact", {})] + [
        (f"{cache}{'+dare' if dare else ''}", "dare" if dare else "exact",
         {"dllm_cache": cache}) for cache, dare in settings]

    def params(extra):
        return SamplingParams(max_tokens=args.gen_length, ignore_eos=True,
                              extra_args={**knobs, **extra})

    for _, engine, extra in runs:
        engines[engine].generate(prompts[:1], params(extra), use_tqdm=False)  # warm-up
    seconds = {label: [] for label, _, _ in runs}
    outputs = {}
    for _ in range(args.reps):
        for label, engine, extra in runs:
            start = time.perf_counter()
            outputs[label] = engines[engine].generate(prompts, params(extra), use_tqdm=False)
            seconds[label].append(time.perf_counter() - start)
    del engines
    gc.collect()
    cleanup_dist_env_and_memory()

    def total(outs, key):
        return sum(o.kv_transfer_params["dllm"][key] for o in outs)

    exact = outputs["exact"]
    rows = []
    for label, engine, extra in runs:
        outs = outputs[label]
        same = sum(a == b for r, o in zip(exact, outs)
                   for a, b in zip(r.outputs[0].token_ids, o.outputs[0].token_ids))
        positions = sum(len(r.outputs[0].token_ids) for r in exact)
        row = {
            "setting": label, "engine": engine, "request_knobs": {**knobs, **extra},
            "seconds": statistics.median(seconds[label]), "round_seconds": seconds[label],
            "speedup_vs_exact": statistics.median(
                e / s for e, s in zip(seconds["exact"], seconds[label])),
            "rows_vs_exact": total(outs, "computed_rows") / total(exact, "computed_rows"),
            "nfe_per_request": total(outs, "forwards") / len(outs),
            "token_agreement": same / positions,
        }
        if engine == "dare":
            dare = [o.kv_transfer_params["dare"] for o in outs]
            rows_in = sum(d["token_layers"] for d in dare)
            row["kv_reuse"] = sum(d["kv_reused"] for d in dare) / rows_in
            row["o_reuse"] = sum(d["o_reused"] for d in dare) / rows_in
        rows.append(row)
    size_keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
    report = {
        "benchmark": "cache_policies_end_to_end",
        "model": model.name, "model_size": {k: config[k] for k in size_keys if k in config},
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_length": args.gen_length,
        "block_length": args.block_length, "steps": args.steps, "dare_tau": args.tau,
        "reps": args.reps, "dtype": "float32", "decoding": "greedy (temperature 0)",
        "timing": "round-robin, one call of each setting per round; median seconds, "
                  "median of per-round ratios to exact",
        "device": f"CPU {platform.machine()}, {os.cpu_count()} cores (vLLM CPU build)",
        "rows": rows,
    }
    print(f"cache policies end to end: {report['model']} {report['model_size']}, batch "
          f"{args.batch}, prompt {args.prompt_len}, gen {args.gen_length}, block "
          f"{args.block_length}, steps {args.steps}, {report['device']}; exact "
          f"{rows[0]['seconds']:.2f}s (median of {args.reps} round-robin rounds)")
    print(f"{'setting':<18}{'seconds':>9}{'speed-up':>9}{'rows':>7}{'NFE':>6}{'agree':>7}"
          f"{'kv re':>7}{'o re':>7}")
    for r in rows:
        print(f"{r['setting']:<18}{r['seconds']:>9.2f}{r['speedup_vs_exact']:>8.2f}x"
              f"{r['rows_vs_exact']:>7.3f}{r['nfe_per_request']:>6.1f}"
              f"{r['token_agreement']:>7.3f}{r.get('kv_reuse', 0):>7.3f}"
              f"{r.get('o_reuse', 0):>7.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    written = [str(json_path), plot(report, out.with_name(out.name + ".png"))]
    print("wrote " + ", ".join(written))
    return report


def plot(report: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [r["setting"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["speedup_vs_exact"] for r in rows], 0.4,
           label="wall-time speed-up vs exact")
    ax.bar([i + 0.2 for i in x], [1 / r["rows_vs_exact"] for r in rows], 0.4,
           label="exact's rows / rows computed")
    ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_ylabel("x exact")
    ax.set_title(f"{report['model']}, batch {report['batch']}, prompt {report['prompt_len']}, "
                 f"gen {report['gen_length']}, block {report['block_length']}, "
                 f"{report['device']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    main()
