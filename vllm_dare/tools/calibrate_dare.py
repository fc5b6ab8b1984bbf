"""Calibrate DARE's thresholds for a model on a prompt set.

Runs the prompts once with nothing reused (the exact result) and once per candidate
threshold (per-request overrides on one engine), and reports for each: the reuse
fraction of K/V and O rows, token agreement with the exact outputs, and task
accuracy where answers are checkable (the project's task set). The largest
threshold whose agreement (and accuracy, if checkable) stays within the budget is
written as an engine config:

    python -m vllm_dare.tools.calibrate_dare --model PATH --out dare.json
    vllm serve PATH --attention-backend dare --additional-config "$(cat dare.json)"

Each row also says what decided the rows: the share forced by rule (first
forwards, refreshes, changed inputs, candidates) and the shares of K/V and O rows
the query-delta predictor refused (delta above tau); the rest were reused. With O
reuse on, a token that is not forced reuses every layer (its queries never move),
so only mode ``kv`` shows the predictor at work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from vllm_dare.cache_policies.dare_reuse import DareSettings, fixed_engine_settings_arg
from vllm_dare.tools.cli_args import HelpFormatter, number_in, positive_int


def _task_prompts(tokenizer, n: int):
    from vllm_dare.training.tasks import TASKS, held_out

    prompts = []
    for task, spec in TASKS.items():
        for ex in held_out(task)[:n]:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": ex.question}], add_generation_prompt=True,
                tokenize=True, return_dict=False,
            )
            prompts.append((ids, spec.gen_length, ex))
    return prompts


def calibrate(args, llm=None) -> dict:
    """Sweep ``args.taus``; ``llm`` (optional) is an engine started with the DARE
    backend for ``args.model`` (and ``args.dare_engine_config``)."""
    from vllm import LLM, SamplingParams

    from vllm_dare.training.tasks import is_correct

    if llm is None:
        llm = LLM(
            model=args.model, dtype=args.dtype, enforce_eager=True,
            max_model_len=args.max_model_len, seed=0,
            attention_backend="dare",
            additional_config={"dare": {"mode": args.mode, "tau_kv": 0.0, "tau_o": 0.0,
                                        **args.dare_engine_config}},
        )
    tok = llm.get_tokenizer()
    if args.prompts:
        lines = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
        items = [(tok.encode(p), args.max_tokens, None) for p in lines]
    else:
        items = _task_prompts(tok, args.per_task)

    def run(tau: float):
        params = []
        for _, gen, _ in items:
            extra = {"dare_tau_kv": tau, "dare_tau_o": tau, "dare_mode": args.mode}
            if args.steps_per_token:
                extra["dllm_steps"] = gen
            params.append(SamplingParams(max_tokens=gen, extra_args=extra))
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": i} for i, _, _ in items], params, use_tqdm=False)
        return outs, time.perf_counter() - start

    exact, t_exact = run(0.0)
    rows = []
    for tau in args.taus:
        outs, seconds = run(tau)
        same = total = kv = o = tl = correct = checkable = forced = kv_ref = o_ref = 0
        for (ids, gen, ex), ref, out in zip(items, exact, outs):
            a, b = ref.outputs[0].token_ids, out.outputs[0].token_ids
            n = max(len(a), len(b))
            same += sum(x == y for x, y in zip(a, b))
            total += n
            stats = out.kv_transfer_params["dare"]
            kv += stats["kv_reused"]
            o += stats["o_reused"]
            tl += stats["token_layers"]
            forced += stats["forced_rows"]
            kv_ref += stats["kv_refused"]
            o_ref += stats["o_refused"]
            if ex is not None:
                checkable += 1
                correct += is_correct(ex, out.outputs[0].text)
        exact_acc = None
        if checkable:
            exact_acc = sum(
                is_correct(ex, r.outputs[0].text) for (_, _, ex), r in zip(items, exact)
            ) / checkable
        rows.append({
            "tau": tau, "kv_reuse": kv / tl, "o_reuse": o / tl, "forced": forced / tl,
            "kv_refused": kv_ref / tl, "o_refused": o_ref / tl,
            "token_agreement": same / total if total else 1.0,
            "accuracy": correct / checkable if checkable else None,
            "exact_accuracy": exact_acc, "seconds": seconds, "exact_seconds": t_exact,
        })
    ok = [r for r in rows
          if r["token_agreement"] >= args.min_agreement
          and (r["accuracy"] is None or r["exact_accuracy"] - r["accuracy"] <= args.max_accuracy_drop)]
    chosen = max(ok, key=lambda r: r["tau"]) if ok else None
    return {
        "model": Path(args.model).name, "mode": args.mode, "prompts": len(items),
        "engine_settings": dict(args.dare_engine_config),
        "min_agreement": args.min_agreement, "max_accuracy_drop": args.max_accuracy_drop,
        "device": platform.machine(), "rows": rows,
        "chosen_tau": chosen["tau"] if chosen else None,
    }


def write_config(report: dict, path: str) -> dict | None:
    """Write the chosen thresholds as an engine config (``--additional-config``)."""
    if report["chosen_tau"] is None:
        return None
    tau = report["chosen_tau"]
    config = {"dare": {"mode": report["mode"], "tau_kv": tau, "tau_o": tau,
                       **report.get("engine_settings", {})}}
    Path(path).write_text(json.dumps(config) + "\n")
    return config


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from vllm_dare.default_model import default_model_path

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter)
    parser.add_argument("--model", default=default_model_path(), help="checkpoint folder")
    parser.add_argument("--prompts", default=None,
                        help="text file, one prompt a line (unset: the task set's "
                             "held-out questions)")
    parser.add_argument("--per-task", type=positive_int, default=30,
                        help="held-out questions per task")
    parser.add_argument("--max-tokens", type=positive_int, default=32,
                        help="generation length for --prompts")
    parser.add_argument("--steps-per-token", action=argparse.BooleanOptionalAction,
                        default=True, help="one denoising step per generated token")
    parser.add_argument("--mode", default="kv+o", choices=["kv", "o", "kv+o"],
                        help="what DARE reuses")
    parser.add_argument("--taus", type=number_in(0.0), nargs="+",
                        default=[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
                        help="thresholds to try (tau_kv = tau_o)")
    parser.add_argument("--min-agreement", type=number_in(0.0, 1.0), default=0.99,
                        help="least token agreement with exact outputs")
    parser.add_argument("--max-accuracy-drop", type=number_in(0.0, 1.0), default=0.01,
                        help="most task accuracy lost against exact")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the engine's compute dtype")
    parser.add_argument("--max-model-len", type=positive_int, default=512,
                        help="the engine's max_model_len")
    parser.add_argument("--out", default="dare.json", help="engine config to write")
    parser.add_argument("--report", default=None,
                        help="JSON report of the sweep to write (unset: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out and --report if they exist")
    parser.add_argument("--dare-engine-config", type=fixed_engine_settings_arg, default={},
                        help="other engine-level DARE settings to calibrate under and "
                             "write, e.g. '{\"refresh_at_block_start\": false}'")
    args = parser.parse_args(argv)
    try:  # the mode calibrated must be one the engine's cache (max_mode) serves
        DareSettings.from_engine_config({**args.dare_engine_config, "mode": args.mode})
    except ValueError as e:
        parser.error(f"--mode {args.mode} with --dare-engine-config: {e}")
    for flag, path in (("--out", args.out), ("--report", args.report)):
        if path and Path(path).exists() and not args.overwrite:
            parser.error(f"{flag} {path} exists; pass --overwrite to replace it")
    report = calibrate(args)
    print(f"model {report['model']}, mode {args.mode}, {report['prompts']} prompts, "
          f"{report['device']}")
    print(f"{'tau':>6} {'kv reuse':>9} {'o reuse':>8} {'forced':>7} {'kv ref':>7} "
          f"{'o ref':>6} {'agree':>7} {'acc':>6} {'exact acc':>9}")
    for r in report["rows"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        ex = "-" if r["exact_accuracy"] is None else f"{r['exact_accuracy']:.3f}"
        print(f"{r['tau']:>6.3f} {r['kv_reuse']:>9.3f} {r['o_reuse']:>8.3f} "
              f"{r['forced']:>7.3f} {r['kv_refused']:>7.3f} {r['o_refused']:>6.3f} "
              f"{r['token_agreement']:>7.3f} {acc:>6} {ex:>9}")
    config = write_config(report, args.out)
    if config is None:
        print("no threshold meets the budget; no config written")
    else:
        print(f"chosen tau {report['chosen_tau']}: wrote {args.out}: {json.dumps(config)}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
