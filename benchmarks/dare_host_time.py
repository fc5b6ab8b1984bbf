"""Host time of one DARE layer step on a GPU, and which calls it goes to.

At small batches a DARE forward launched eagerly is bound by the host (docs/dare.md:
the whole LLaDA-8B stack at 1 x 256 tokens runs at 0.42x of exact eagerly, 0.87x in
GPU time). This measures where the host's time goes: the layer benchmark's step
(``dare_attention.Stack``, one attention layer) is enqueued ``--calls`` times with
no sync in between, so each call costs what the host spends on it, while the GPU,
which has less to do, keeps up; the kernel wrappers of the step (``runtime.ops``) are
timed on the host around each call. "rest" is the step's time outside them: the
Python of the step and its ATen ops (the benchmark's projection matmuls,
allocations).

    python benchmarks/dare_host_time.py --out dare_host_time.json

Prints a table (microseconds per layer) and writes JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dare_attention  # noqa: E402


class TimedOps:
    """The kernel set, with the host time of each call added up per wrapper."""

    def __init__(self, ops):
        self._ops = ops
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name):
        fn = getattr(self._ops, name)
        if not callable(fn):
            return fn

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return result

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(dare_attention.SHAPES), default="llada-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dare_host_time.py needs a CUDA GPU")
    device = torch.device("cuda")
    stack_args = argparse.Namespace(shape=args.shape, scope="attention", layers=1,
                                    batch=args.batch, seq_len=args.seq_len, block_size=16,
                                    dtype="bfloat16", reps=1)
    stack = dare_attention.Stack(stack_args, device, torch.bfloat16)
    n = round(0.87 * stack.T)
    settings = {
        "mode off": stack.runtime(None),
        "0% forced": stack.runtime(torch.zeros(0, dtype=torch.long, device=device)),
        "87% reused": stack.runtime(torch.randperm(stack.T, generator=stack.g)[:n].to(device)),
        "0% by the predictor": stack.runtime(torch.zeros(0, dtype=torch.long, device=device),
                                             predicted_none=True),
    }
    shifted = stack.x * 1.5
    fns = {"exact": stack.exact}
    for name, runtime in settings.items():
        x = shifted if name == "0% by the predictor" else None
        fns[name] = lambda runtime=runtime, x=x: stack.dare(runtime, x)
    results = {}
    for name, fn in fns.items():
        for _ in range(3):  # compile, warm up
            fn()
        torch.cuda.synchronize()
        runtime = settings.get(name)
        timed = TimedOps(runtime.ops) if runtime is not None else None
        if runtime is not None:
            runtime.ops = timed
        start = time.perf_counter()
        for _ in range(args.calls):
            fn()
        enqueued = time.perf_counter() - start
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        entry = {"host_us": enqueued / args.calls * 1e6,
                 "wall_us": total / args.calls * 1e6}
        if timed is not None:
            entry["ops_us"] = {op: timed.seconds[op] / args.calls * 1e6 for op in timed.seconds}
            entry["launches"] = {op: timed.calls[op] / args.calls for op in timed.calls}
            entry["rest_us"] = entry["host_us"] - sum(entry["ops_us"].values())
            runtime.ops = timed._ops
        results[name] = entry
    print(f"host time of one attention layer, {args.shape}, {stack.R} x {stack.L} tokens, bf16, "
          f"{torch.cuda.get_device_name()} (us per layer; {args.calls} calls enqueued, "
          "no sync between)")
    ops = sorted({op for e in results.values() for op in e.get("ops_us", {})})
    print(f"{'setting':>20} {'host':>7} {'wall':>7} {'rest':>6} " + " ".join(f"{op:>20}" for op in ops))
    for name, e in results.items():
        cells = " ".join(f"{e['ops_us'][op]:>20.1f}" if op in e.get("ops_us", {})
                         else f"{'-':>20}" for op in ops)
        rest = f"{e['rest_us']:>6.1f}" if "rest_us" in e else f"{'-':>6}"
        print(f"{name:>20} {e['host_us']:>7.1f} {e['wall_us']:>7.1f} {rest} {cells}")
    report = {"benchmark": "dare_host_time", "shape": args.shape, "batch": stack.R,
              "seq_len": stack.L, "dtype": "bfloat16", "calls": args.calls,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "timing": "host_us: enqueue time per call (no sync between calls); wall_us: "
                        "with the final sync; ops_us: host time inside each kernel wrapper",
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
