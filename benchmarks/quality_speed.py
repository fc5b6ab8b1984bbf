"""Quality and speed of every mode on a trained model's held-out task set.

Runs the project's task set (``vllm_dare.training.tasks``, held-out split) through
the vLLM engine once per mode and reports, per mode: task accuracy, token agreement
with exact mode, denoising forward passes per request (NFE), tokens per forward,
token-layer rows computed relative to exact mode, DARE reuse fractions, wall time
and its ratio to exact mode measured in this run.
Writes JSON plus two plots: accuracy vs. speed-up per mode, and a per-layer x
per-forward reuse heat map for one DARE mode.

Modes (``--modes``):

* ``exact``               -- vLLM's own attention backend, every activation recomputed
* ``exact:steps/K``       -- exact, with K times fewer denoising steps (K tokens per step)
* ``exact:random``        -- LLaDA with random remasking (``dllm_remasking`` =
  ``random``, ``dllm_seed`` 0): the baseline of ``exact:random@dkv_greedy``
  (dKV-Cache Greedy needs it)
* ``exact:blocks``        -- Dream: Fast-dLLM's block-wise Dream generation
  (``dllm_block_length`` = ``--block-length``) with no cache; Dream modes with
  ``@prefix``, ``@dual`` or parallel decoding run it too
* ``dare-kv:TAU``, ``dare-o:TAU``, ``dare-kv+o:TAU`` -- the DARE backend with
  ``tau_kv`` and/or ``tau_o`` = TAU (per-request overrides on one DARE engine);
  ``dare-...:TAU,candidates`` also recomputes the positions the step may unmask
  (``dare_recompute_candidates``); ``candidates=N`` only the N of them the previous
  step ranked most confident (``dare_candidate_limit``)
* ``MODE@CACHE``          -- any of the above with the request's cache policy
  ``dllm_cache`` = CACHE (``prefix``, ``dual``, ...; ``vllm_dare.cache_policies``),
  e.g. ``exact@dual``, ``dare-kv+o:0.05@dual``
* ``MODE~RULE:VALUE``     -- any of the above with Fast-dLLM parallel decoding
  (``dllm_parallel`` = ``threshold`` with ``dllm_threshold`` = VALUE, or
  ``factor`` with ``dllm_factor`` = VALUE; LLaDA), e.g. ``exact~threshold:0.9``,
  ``exact@dual~threshold:0.9``

Exact-mode engines and the DARE engine are built one after the other in this process.
Every task's prompts go into one ``generate`` call, all requests admitted together
(``max_num_seqs`` / ``max_num_batched_tokens`` are sized for it), so the engine's
forwards line up with the denoising steps for the heat map.

    .venv/bin/python benchmarks/quality_speed.py --model vllm_dare/models/llada-tasks
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from vllm_dare.cache_policies.dare_reuse import (  # noqa: E402
    DareSettings,
    fixed_engine_settings_arg,
)
from vllm_dare.tools.cli_args import HelpFormatter, positive_int  # noqa: E402

DEFAULT_MODES = [
    "exact", "exact:steps/2",
    "dare-kv:0.02", "dare-kv:0.05", "dare-kv:0.1",
    "dare-o:0.02", "dare-o:0.05", "dare-o:0.1",
    "dare-kv+o:0.02", "dare-kv+o:0.05", "dare-kv+o:0.1", "dare-kv+o:0.2",
    "exact@prefix", "exact@dual", "exact@dkv_decode", "exact@freecache",
    "dare-kv+o:0.05@dual",
]


@dataclass(frozen=True)
class Mode:
    name: str
    engine: str  # "exact" or "dare"
    steps_divisor: int = 1
    extra_args: dict = field(default_factory=dict)


def parse_mode(text: str) -> Mode:
    """``exact``, ``exact:steps/K``, ``dare-{kv,o,kv+o}:TAU[,candidates[=N]]``, each
    optionally followed by ``@CACHE`` (a cache policy) and ``~RULE:VALUE``
    (parallel decoding)."""
    if "~" in text:
        base, parallel = text.rsplit("~", 1)
        rule, _, value = parallel.partition(":")
        if rule not in ("threshold", "factor") or not value:
            raise ValueError(f"bad parallel decoding {parallel!r} in mode {text!r} "
                             "(threshold:TAU or factor:F)")
        mode = parse_mode(base)
        knob = "dllm_threshold" if rule == "threshold" else "dllm_factor"
        return Mode(text, mode.engine, mode.steps_divisor,
                    {**mode.extra_args, "dllm_parallel": rule, knob: float(value)})
    if "@" in text:
        from vllm_dare.cache_policies import policies

        base, cache = text.rsplit("@", 1)
        if cache not in policies() or cache == "none":
            raise ValueError(f"unknown cache policy {cache!r} in mode {text!r} "
                             f"({', '.join(c for c in policies() if c != 'none')})")
        mode = parse_mode(base)
        return Mode(text, mode.engine, mode.steps_divisor,
                    {**mode.extra_args, "dllm_cache": cache})
    if text == "exact":
        return Mode(text, "exact")
    if text == "exact:random":
        return Mode(text, "exact", extra_args={"dllm_remasking": "random", "dllm_seed": 0})
    if text == "exact:blocks":
        return Mode(text, "exact", extra_args={"blocks": True})
    if text.startswith("exact:steps/"):
        k = int(text.split("/", 1)[1])
        if k < 1:
            raise ValueError(f"bad steps divisor in mode {text!r}")
        return Mode(text, "exact", steps_divisor=k)
    if text.startswith("dare-") and ":" in text:
        kind, rest = text[len("dare-"):].split(":", 1)
        if kind not in ("kv", "o", "kv+o"):
            raise ValueError(f"unknown DARE mode {kind!r} in {text!r} (kv, o, kv+o)")
        tau_text, *options = rest.split(",")
        tau = float(tau_text)
        if tau < 0:
            raise ValueError(f"negative threshold in mode {text!r}")
        extra_args = {
            "dare_mode": kind, "dare_tau_kv": tau if "kv" in kind else 0.0,
            "dare_tau_o": tau if "o" in kind else 0.0,
            "dare_recompute_candidates": False,
        }
        for option in options:
            name, _, value = option.partition("=")
            if name != "candidates":
                raise ValueError(f"unknown DARE option {option!r} in {text!r} "
                                 "(candidates or candidates=N)")
            extra_args["dare_recompute_candidates"] = True
            if value:
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"candidates=N needs an integer N >= 1 in {text!r}")
                extra_args["dare_candidate_limit"] = int(value)
        return Mode(text, "dare", extra_args=extra_args)
    raise ValueError(
        f"unknown mode {text!r}: use exact, exact:steps/K or "
        f"dare-{{kv,o,kv+o}}:TAU[,candidates[=N]], each optionally with @CACHE "
        f"and ~threshold:TAU or ~factor:F"
    )


def family_of(model: str) -> str:
    config = json.loads((Path(model) / "config.json").read_text())
    return "dream" if config.get("model_type") == "Dream" else "llada"


def dream_blockwise(mode_args: dict) -> bool:
    """Whether a Dream mode runs Fast-dLLM's block-wise Dream generation: asked
    for (``exact:blocks``), or needed by its cache policy or parallel decoding."""
    return (mode_args.get("blocks", False) or "dllm_parallel" in mode_args
            or mode_args.get("dllm_cache") in ("prefix", "dual"))


def decoding_args(family: str, gen_length: int, args, steps_divisor: int,
                  blocks: bool = False) -> dict:
    """Knobs of a request; ``blocks``: Dream's block-wise generation."""
    steps = max(1, gen_length // steps_divisor)
    extra = {"dllm_steps": steps}
    if family == "dream" and blocks:
        block = min(args.block_length, gen_length)
        blocks_n = gen_length // block
        extra["dllm_block_length"] = block
        extra["dllm_steps"] = max(2 * blocks_n, steps - steps % blocks_n)
    elif family == "llada":
        block = min(args.block_length, gen_length)
        extra["dllm_block_length"] = block
        # every block gets the same number of steps
        blocks = gen_length // block
        extra["dllm_steps"] = max(blocks, steps - steps % blocks)
    else:
        extra["dllm_alg"] = args.dream_alg
    return extra


def token_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)), n


def run_mode(llm, mode: Mode, family: str, task_items: dict, args) -> dict:
    """One mode over every task: outputs, seconds, per-request stats, DARE traces."""
    from vllm import SamplingParams

    from vllm_dare.cache_policies import dare_counters
    from vllm_dare.training.tasks import TASKS

    result = {}
    for task, items in task_items.items():
        gen = TASKS[task].gen_length
        knobs = {k: v for k, v in mode.extra_args.items() if k != "blocks"}
        extra = {**decoding_args(family, gen, args, mode.steps_divisor,
                                 blocks=dream_blockwise(mode.extra_args)), **knobs}
        if "dllm_parallel" in extra:
            del extra["dllm_steps"]  # parallel decoding takes the steps it needs
        params = SamplingParams(max_tokens=gen, extra_args=extra)
        prompts = [{"prompt_token_ids": ids} for ids, _ in items]
        if mode.engine == "dare":
            dare_counters.start_trace()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        trace = dare_counters.stop_trace() if mode.engine == "dare" else None
        result[task] = {"outputs": outs, "seconds": seconds, "trace": trace, "extra": extra}
    return result


def summarize_mode(mode: Mode, run: dict, exact: dict | None, task_items: dict) -> dict:
    from vllm_dare.training.tasks import is_correct

    row = {"mode": mode.name, "tasks": {}}
    totals = {"correct": 0, "n": 0, "same": 0, "positions": 0, "forwards": 0,
              "tokens": 0, "rows": 0, "token_layers": 0, "kv": 0, "o": 0, "forced": 0,
              "kv_refused": 0, "o_refused": 0, "seconds": 0.0}
    for task, items in task_items.items():
        outs = run[task]["outputs"]
        t = {k: 0 for k in totals}
        t["seconds"] = run[task]["seconds"]
        for i, ((_, ex), out) in enumerate(zip(items, outs)):
            t["correct"] += is_correct(ex, out.outputs[0].text)
            t["n"] += 1
            if exact is not None:
                same, n = token_agreement(exact[task]["outputs"][i].outputs[0].token_ids,
                                          out.outputs[0].token_ids)
                t["same"] += same
                t["positions"] += n
            stats = out.kv_transfer_params or {}
            dllm = stats.get("dllm", {})
            t["forwards"] += dllm.get("forwards", 0)
            t["tokens"] += dllm.get("gen_length", 0)
            t["rows"] += dllm.get("computed_rows", 0)
            dare = stats.get("dare")
            if dare is not None:
                t["token_layers"] += dare["token_layers"]
                t["kv"] += dare["kv_reused"]
                t["o"] += dare["o_reused"]
                t["forced"] += dare["forced_rows"]
                t["kv_refused"] += dare["kv_refused"]
                t["o_refused"] += dare["o_refused"]
        for k in totals:
            totals[k] += t[k]
        row["tasks"][task] = _ratios(t, run[task]["extra"])
    row.update(_ratios(totals, None))
    return row


def _ratios(t: dict, extra: dict | None) -> dict:
    out = {
        "accuracy": t["correct"] / t["n"],
        "token_agreement": t["same"] / t["positions"] if t["positions"] else None,
        "nfe_per_request": t["forwards"] / t["n"],
        "tokens_per_forward": t["tokens"] / t["forwards"] if t["forwards"] else None,
        "computed_rows": t["rows"],
        "kv_reused_rows": t["kv"],
        "o_reused_rows": t["o"],
        "kv_reuse": t["kv"] / t["token_layers"] if t["token_layers"] else None,
        "o_reuse": t["o"] / t["token_layers"] if t["token_layers"] else None,
        # What decides DARE's rows: the forced-row rules (first forwards, refreshes,
        # changed inputs, candidates) and, for the rest, the query-delta predictor;
        # shares of the token-layer rows.
        "forced_share": t["forced"] / t["token_layers"] if t["token_layers"] else None,
        "kv_refused_share": t["kv_refused"] / t["token_layers"] if t["token_layers"] else None,
        "o_refused_share": t["o_refused"] / t["token_layers"] if t["token_layers"] else None,
        "seconds": t["seconds"],
        "requests": t["n"],
    }
    if extra is not None:
        out["request_knobs"] = extra
    return out


def heat_map(trace) -> dict:
    """Per-layer x per-forward reuse fractions from a DARE trace."""
    import numpy as np

    tokens = np.maximum(trace[..., 0], 1)
    return {
        "kv_reuse": (trace[..., 1] / tokens).T.round(4).tolist(),  # [layers][forwards]
        "o_reuse": (trace[..., 2] / tokens).T.round(4).tolist(),
    }


def plot(report: dict, out_prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    markers = "osD^v<>pPX*h"
    for k, row in enumerate(report["rows"]):
        # A legend, not labels at the points: modes of equal accuracy and speed
        # would draw their labels on top of each other.
        ax.scatter(row["speedup_vs_exact"], 100 * row["accuracy"], s=36,
                   marker=markers[k % len(markers)], label=row["mode"])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_xlabel("wall-time speed-up vs. exact (same run)")
    ax.set_ylabel("mean task accuracy (%)")
    s = report["settings"]
    ax.set_title(f"{s['model']} ({s['hardware']})", fontsize=9)
    ax.grid(alpha=0.3)
    path = out_prefix.with_name(out_prefix.name + "_accuracy_vs_speedup.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(str(path))

    maps = report.get("heat_maps", {})
    if maps:
        tasks = list(maps["tasks"])
        fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), squeeze=False,
                                 layout="constrained")
        for j, task in enumerate(tasks):
            for i, key in enumerate(("kv_reuse", "o_reuse")):
                data = np.array(maps["tasks"][task][key])
                im = axes[i, j].imshow(data, aspect="auto", vmin=0, vmax=1, cmap="viridis",
                                       interpolation="nearest")
                axes[i, j].set_title(f"{task}: {key.replace('_', ' ')}", fontsize=9)
                axes[i, j].set_xlabel("forward pass")
                axes[i, j].set_ylabel("layer")
                axes[i, j].set_yticks(range(data.shape[0]))
        fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of token rows reused")
        fig.suptitle(f"DARE reuse per layer and forward: {maps['mode']}", fontsize=10)
        path = out_prefix.with_name(out_prefix.name + "_reuse_heatmap.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (vLLM CUDA build)"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores (vLLM CPU build)"


def evaluate(args, engine_for=None) -> dict:
    """Run every mode. ``engine_for(kind, **engine_kwargs)`` (optional) supplies the
    exact / DARE engine instead of building and shutting one down here."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    from vllm_dare.training.tasks import TASKS, held_out
    from vllm_dare.training.train import prompt_ids

    modes = [parse_mode(m) for m in args.modes]
    if not modes or modes[0].name != "exact":
        modes = [parse_mode("exact")] + [m for m in modes if m.name != "exact"]
    # Every DARE mode measured must be one the engine's cache (max_mode) serves;
    # the engine's default mode is the most it serves (each request sets its own).
    for m in modes:
        if m.engine == "dare":
            try:
                DareSettings.from_engine_config(
                    {**args.dare_engine_config, "mode": m.extra_args["dare_mode"]})
            except ValueError as e:
                raise SystemExit(f"mode {m.name!r} with --dare-engine-config: {e}") from None
    engine_mode = DareSettings.from_engine_config(args.dare_engine_config).mode
    family = family_of(args.model)
    tasks = args.tasks

    longest = max(TASKS[t].gen_length for t in tasks)
    common = dict(
        model=args.model, dtype=args.dtype, enforce_eager=True, seed=0,
        max_model_len=args.max_model_len, max_num_seqs=max(args.per_task, 1),
        max_num_batched_tokens=max(args.per_task, 1) * args.max_model_len,
    )

    def build(engine: str):
        kwargs = {} if engine == "exact" else dict(
            attention_backend="dare",
            additional_config={"dare": {"mode": engine_mode, "tau_kv": 0.0, "tau_o": 0.0,
                                        **args.dare_engine_config}},
        )
        if engine_for is not None:
            return engine_for(engine, **kwargs)
        return LLM(**common, **kwargs)

    runs: dict[str, dict] = {}
    task_items = None
    for engine in ("exact", "dare"):
        engine_modes = [m for m in modes if m.engine == engine]
        if not engine_modes:
            continue
        llm = build(engine)
        if task_items is None:
            tok = llm.get_tokenizer()
            task_items = {
                t: [(prompt_ids(tok, ex.question), ex) for ex in held_out(t)[: args.per_task]]
                for t in tasks
            }
        # Warm-up: one request per task, not timed.
        run_mode(llm, engine_modes[0], family,
                 {t: items[:1] for t, items in task_items.items()}, args)
        for mode in engine_modes:
            print(f"running {mode.name} ...", flush=True)
            runs[mode.name] = run_mode(llm, mode, family, task_items, args)
        if engine_for is None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()

    exact = runs["exact"]
    rows = []
    for mode in modes:
        row = summarize_mode(mode, runs[mode.name], exact, task_items)
        rows.append(row)
    t_exact = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_exact"] = t_exact / row["seconds"]
        # Token-layer rows the forwards computed, relative to exact mode's.
        row["rows_vs_exact"] = row["computed_rows"] / rows[0]["computed_rows"]
        # K/V projections and attention rows computed (DARE skips some of the
        # rows the forwards feed), relative to exact mode's.
        row["kv_rows_vs_exact"] = ((row["computed_rows"] - row["kv_reused_rows"])
                                   / rows[0]["computed_rows"])
        row["attention_rows_vs_exact"] = ((row["computed_rows"] - row["o_reused_rows"])
                                          / rows[0]["computed_rows"])
        for t in tasks:
            row["tasks"][t]["rows_vs_exact"] = (row["tasks"][t]["computed_rows"]
                                                / rows[0]["tasks"][t]["computed_rows"])
        row["accuracy_drop_vs_exact_points"] = {
            t: round(100 * (rows[0]["tasks"][t]["accuracy"] - row["tasks"][t]["accuracy"]), 2)
            for t in tasks
        }

    report = {
        "benchmark": "quality_speed",
        "settings": {
            "model": Path(args.model).name, "family": family, "dtype": args.dtype,
            "tasks": {t: {"gen_length": TASKS[t].gen_length,
                          "prompt_tokens": len(task_items[t][0][0]),
                          "requests": len(task_items[t])} for t in tasks},
            "steps": "gen_length / K (one token per step for K = 1)",
            "block_length": (
                min(args.block_length, longest)
                if family == "llada" or any(dream_blockwise(m.extra_args) for m in modes)
                else None),
            "dream_alg": (f"{args.dream_alg} (block-wise modes: negative entropy)"
                          if family == "dream" else None),
            "dare_engine_config": args.dare_engine_config,
            "batch": f"all requests of a task in one generate call ({args.per_task})",
            "hardware": hardware(), "decoding": "greedy (temperature 0)",
        },
        "rows": rows,
    }
    dare_modes = [m.name for m in modes if m.engine == "dare"]
    heat_mode = args.heat_map_mode or next(
        (m for m in dare_modes if m.startswith("dare-kv+o:")), dare_modes[0] if dare_modes else None
    )
    if heat_mode is not None:
        if heat_mode not in runs or runs[heat_mode][tasks[0]]["trace"] is None:
            raise SystemExit(f"--heat-map-mode {heat_mode!r} is not one of the DARE modes run")
        report["heat_maps"] = {
            "mode": heat_mode,
            "tasks": {t: heat_map(runs[heat_mode][t]["trace"]) for t in tasks},
        }
    return report


def print_table(report: dict) -> None:
    s = report["settings"]
    tasks = list(s["tasks"])
    print(f"\nmodel {s['model']} ({s['family']}, {s['dtype']}), hardware {s['hardware']}")
    print("tasks: " + ", ".join(
        f"{t} (prompt {v['prompt_tokens']} tok, gen {v['gen_length']}, {v['requests']} req)"
        for t, v in s["tasks"].items()))
    print(f"steps: {s['steps']}; block length: {s['block_length']}; "
          f"Dream alg: {s['dream_alg']}; batch: {s['batch']}; {s['decoding']}"
          + (f"; DARE engine settings: {json.dumps(s['dare_engine_config'])}"
             if s.get("dare_engine_config") else ""))
    head = (f"{'mode':<22}" + "".join(f"{'acc ' + t:>10}" for t in tasks)
            + f"{'agree':>7}{'NFE':>6}{'tok/fw':>7}{'rows':>7}{'kv re':>7}{'o re':>7}"
            f"{'forced':>7}{'kv rf':>7}{'o rf':>7}{'sec':>7}{'speedup':>8}")
    print(head)

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in report["rows"]:
        print(f"{r['mode']:<22}"
              + "".join(f"{100 * r['tasks'][t]['accuracy']:>10.1f}" for t in tasks)
              + f"{f(r['token_agreement'], '.3f'):>7}{r['nfe_per_request']:>6.1f}"
              + f"{f(r['tokens_per_forward'], '.2f'):>7}{r['rows_vs_exact']:>7.3f}"
              + f"{f(r['kv_reuse'], '.3f'):>7}"
              + f"{f(r['o_reuse'], '.3f'):>7}{f(r['forced_share'], '.3f'):>7}"
              + f"{f(r['kv_refused_share'], '.3f'):>7}{f(r['o_refused_share'], '.3f'):>7}"
              + f"{r['seconds']:>7.2f}"
              + f"{r['speedup_vs_exact']:>7.2f}x")


def markdown_table(report: dict) -> str:
    """The table as Markdown, settings first (for docs/evaluation.md)."""
    s = report["settings"]
    tasks = list(s["tasks"])

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        f"Model `{s['model']}` ({s['family']}, computing in {s['dtype']}), {s['hardware']}; "
        + "; ".join(f"{t}: prompt {v['prompt_tokens']} tokens, gen {v['gen_length']}, "
                    f"{v['requests']} requests" for t, v in s["tasks"].items())
        + f"; steps {s['steps']}; block length {s['block_length']}; Dream alg "
        f"{s['dream_alg']}; batch: {s['batch']}; {s['decoding']}"
        + (f"; DARE engine settings {json.dumps(s['dare_engine_config'])}"
           if s.get("dare_engine_config") else "") + ".",
        "",
        "| mode | " + " | ".join(f"{t} acc %" for t in tasks)
        + " | agreement | NFE | tokens/forward | rows vs exact | K/V reuse | O reuse"
        " | forced | K/V refused | O refused | seconds | speed-up |",
        "|---" * (len(tasks) + 12) + "|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | " + " | ".join(pct(r["tasks"][t]["accuracy"]) for t in tasks)
            + f" | {num(r['token_agreement'], '.3f')} | {r['nfe_per_request']:.1f}"
            + f" | {num(r['tokens_per_forward'], '.2f')} | {r['rows_vs_exact']:.3f}"
            + f" | {pct(r['kv_reuse'])}"
            + f" | {pct(r['o_reuse'])} | {pct(r['forced_share'])}"
            + f" | {pct(r['kv_refused_share'])} | {pct(r['o_refused_share'])}"
            + f" | {r['seconds']:.1f} | {r['speedup_vs_exact']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _mode_arg(text: str) -> str:
    """``argparse`` type of ``--modes``: a mode ``parse_mode`` accepts."""
    try:
        parse_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv=None, engine_for=None) -> dict:
    from vllm_dare.default_model import default_model_path
    from vllm_dare.training.tasks import TASKS

    head, _, modes_help = __doc__.partition("Modes (``--modes``):")
    parser = argparse.ArgumentParser(
        description=head.strip(), epilog="modes (--modes):" + modes_help.split("\n    ")[0],
        formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None,
                        help="checkpoint folder (default: the packaged default model)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS),
                        help="tasks of the held-out set to run")
    parser.add_argument("--per-task", type=positive_int, default=200,
                        help="held-out examples per task")
    parser.add_argument("--modes", nargs="+", type=_mode_arg, default=DEFAULT_MODES,
                        help="modes to run, exact first (grammar below)")
    parser.add_argument("--block-length", type=positive_int, default=8,
                        help="block length of LLaDA and of Dream's block-wise modes")
    parser.add_argument("--dream-alg", default="maskgit_plus",
                        choices=["origin", "maskgit_plus", "topk_margin", "entropy"],
                        help="Dream's unmasking algorithm (modes that are not block-wise)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the engines' compute dtype")
    parser.add_argument("--max-model-len", type=positive_int, default=128,
                        help="the engines' max_model_len")
    parser.add_argument("--heat-map-mode", default=None,
                        help="DARE mode whose reuse heat map is drawn (default: the first kv+o one)")
    parser.add_argument("--out", default="benchmarks/results/quality_speed",
                        help="output prefix: PREFIX.json, PREFIX.md and PREFIX_*.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results at --out if they exist")
    parser.add_argument("--dare-engine-config", type=fixed_engine_settings_arg, default={},
                        help="engine-level DARE settings for the DARE modes, e.g. "
                             "'{\"refresh_at_block_start\": false}' (docs/dare.md, Knobs)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write the JSON and Markdown table only")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = default_model_path()
    out = Path(args.out)
    existing = out.with_name(out.name + ".json")
    if existing.exists() and not args.overwrite:
        parser.error(f"--out {existing} exists; pass --overwrite to replace it")
    report = evaluate(args, engine_for)
    print_table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_name(out.name + ".json")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path = out.with_name(out.name + ".md")
    md_path.write_text(markdown_table(report))
    written = [str(json_path), str(md_path)] + ([] if args.no_plots else plot(report, out))
    print("wrote " + ", ".join(written))
    return report


if __name__ == "__main__":
    main()
