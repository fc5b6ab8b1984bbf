"""Load benchmark of the OpenAI server (``vllm-dare serve``) on a task model.

Starts the server (DARE backend, engine default mode), then

1. **scaling**: valid greedy requests (the task questions with the load's knob
   sets: exact mode, DARE reuse, classifier-free guidance, several blocks) at
   1, 4, 16 and 32 concurrent clients; requests/s, output tokens/s, p50/p95
   latency, and throughput relative to 1 client, all from this one run;
2. **mixed load with faults**: ``--requests`` requests (default 1,000) at
   ``--concurrency`` clients (default 32) of the load-and-fault test's mix
   (``vllm_dare/tools/server_load.py``: abandoned streams, client time-outs,
   invalid and over-long requests among them), in ``--rounds`` rounds; after
   each round the resident memory of the engine-core and worker processes
   (the soak), then every completed output compared with the same request run
   alone, HTTP statuses, and the server's running/waiting requests and KV-cache
   usage at the end.

Prints a table and writes JSON (``--out``; an existing file is kept unless
``--overwrite``).

    .venv/bin/python benchmarks/server_load.py [--model PATH] [--requests N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from vllm_dare.default_model import default_model_path
from vllm_dare.tools import server_load

SCALING_CONCURRENCY = (1, 4, 16, 32)


def process_rss_mib(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of ``pid``'s descendants by process title
    (``VLLM::EngineCore``, ``VLLM::Worker``)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,rss,args"], capture_output=True,
                         text=True).stdout.splitlines()[1:]
    rows = [line.split(None, 3) for line in out]
    children: dict[int, list] = {}
    for pid_s, ppid_s, rss, args in rows:
        children.setdefault(int(ppid_s), []).append((int(pid_s), int(rss), args))
    found, stack = {}, [pid]
    while stack:
        for child, rss, args in children.get(stack.pop(), []):
            stack.append(child)
            if args.startswith("VLLM::"):
                found[args.split()[0]] = round(rss / 1024, 1)
    return found


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=default_model_path(),
                        help="model folder (default: the packaged default model)")
    parser.add_argument("--requests", type=positive, default=1000,
                        help="requests of the mixed load")
    parser.add_argument("--concurrency", type=positive, default=32,
                        help="clients of the mixed load")
    parser.add_argument("--rounds", type=positive, default=10,
                        help="rounds the mixed load is sent in (memory sampled after each)")
    parser.add_argument("--scaling-requests", type=positive, default=4,
                        help="requests per client at each scaling point (at least 24 in all)")
    parser.add_argument("--max-model-len", type=positive, default=128)
    parser.add_argument("--max-num-seqs", type=positive, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/server_load_cpu.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists")
    args = parser.parse_args()
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")

    server_args = ["--served-model-name", "dllm", "--attention-backend", "dare",
                   "--max-model-len", str(args.max_model_len),
                   "--max-num-seqs", str(args.max_num_seqs)]
    log = Path(tempfile.mkdtemp(prefix="vllm-dare-load-")) / "server.log"
    server = server_load.Server(args.model, server_args, log,
                                env_updates={"VLLM_CPU_KVCACHE_SPACE": "1"})
    print(f"server healthy after {server.start_seconds:.1f}s (log: {log})", flush=True)
    report: dict = {
        "benchmark": "server_load", "model": Path(args.model).name,
        "command": "vllm-dare serve MODEL " + " ".join(server_args),
        "device": f"CPU {platform.machine()}, {os.cpu_count()} cores (vLLM CPU build)",
        "start_seconds": round(server.start_seconds, 1),
    }
    try:
        # Warm-up: one request of each knob set.
        warm = server_load.make_requests(12, seed=args.seed + 99,
                                         weights={"greedy": 1},
                                         max_model_len=args.max_model_len)
        server_load.run_load(server.base, "dllm", warm, 4)

        scaling = []
        for conc in SCALING_CONCURRENCY:
            n = max(24, args.scaling_requests * conc)
            load = server_load.make_requests(n, seed=args.seed + conc, weights={"greedy": 1},
                                             max_model_len=args.max_model_len)
            results, wall = server_load.run_load(server.base, "dllm", load, conc)
            summary = server_load.summarize(results, wall, conc)
            scaling.append(asdict(summary))
            print(f"scaling: {conc:>2} clients, {n} requests, {wall:.1f}s, "
                  f"{summary.requests_per_s:.2f} req/s", flush=True)
        base_rps = scaling[0]["requests_per_s"]
        base_tps = scaling[0]["output_tokens_per_s"]
        for row in scaling:
            row["requests_per_s_vs_1"] = row["requests_per_s"] / base_rps
            row["output_tokens_per_s_vs_1"] = row["output_tokens_per_s"] / base_tps
        report["scaling"] = scaling

        load = server_load.make_requests(args.requests, seed=args.seed,
                                         max_model_len=args.max_model_len)
        per_round = -(-len(load) // args.rounds)
        results, rounds, wall = [], [], 0.0
        rss_start = process_rss_mib(server.proc.pid)
        for r in range(args.rounds):
            chunk = load[r * per_round:(r + 1) * per_round]
            if not chunk:
                break
            got, seconds = server_load.run_load(server.base, "dllm", chunk, args.concurrency)
            results += got
            wall += seconds
            rss = process_rss_mib(server.proc.pid)
            rounds.append({"round": r, "requests": len(chunk), "seconds": round(seconds, 1),
                           "rss_mib": rss})
            print(f"mixed load round {r}: {len(chunk)} requests, {seconds:.1f}s, "
                  f"memory {rss}", flush=True)
        alone = server_load.run_alone(server.base, "dllm", results)
        problems = server_load.check(results, alone)
        summary = server_load.summarize(results, wall, args.concurrency)
        kinds: dict = {}
        for res in results:
            kinds.setdefault(res.request.kind, {}).setdefault(str(res.status), 0)
            kinds[res.request.kind][str(res.status)] += 1
        report["mixed"] = {
            "requests": len(results), "concurrency": args.concurrency,
            "summary": asdict(summary), "statuses_by_kind": kinds,
            "problems": problems, "compared_with_alone": len(server_load.completed_greedy(results)),
            "distinct_requests_run_alone": len(alone),
            "rss_mib_start": rss_start, "rounds": rounds,
            "idle_after": server_load.idle_state(server.base),
        }
    finally:
        report["exit_code"] = server.stop()

    print(f"\nvllm-dare serve load: {report['model']}, {report['command']}; {report['device']}")
    print(f"{'clients':>7} {'req':>5} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'req/s vs 1':>10}")
    for row in report["scaling"]:
        print(f"{row['concurrency']:>7} {row['requests']:>5} {row['requests_per_s']:>7.2f} "
              f"{row['output_tokens_per_s']:>7.1f} {row['p50_latency_s']:>7.2f} "
              f"{row['p95_latency_s']:>7.2f} {row['requests_per_s_vs_1']:>9.2f}x")
    mixed = report["mixed"]
    s = mixed["summary"]
    print(f"\nmixed load with faults: {mixed['requests']} requests at {mixed['concurrency']} "
          f"clients in {s['wall_s']:.0f}s: {s['requests_per_s']:.2f} completed req/s, "
          f"p50 {s['p50_latency_s']:.2f}s, p95 {s['p95_latency_s']:.2f}s")
    print(f"statuses by kind: {mixed['statuses_by_kind']}")
    print(f"outputs compared with the request alone: {mixed['compared_with_alone']}, "
          f"problems: {len(mixed['problems'])}")
    print(f"memory (MiB) at start {mixed['rss_mib_start']}, after each round: "
          f"{[r['rss_mib'] for r in mixed['rounds']]}")
    print(f"after the load: {mixed['idle_after']}; server exit code {report['exit_code']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if mixed["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
