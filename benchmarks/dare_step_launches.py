"""What one DARE layer step launches: PyTorch ops and Triton kernels per layer.

On a GPU a DARE forward at small batches is bound by the host (docs/dare.md): each
layer's ops and kernels cost more host time to launch than the GPU takes to run
them. This counts them on the layer benchmark's step (``dare_attention.Stack``)
with the Triton kernels, on any machine: ATen ops through a ``TorchDispatchMode``,
Triton launches at the launcher (the kernels run under Triton's interpreter on
CPU). View ops, which launch no work, are listed apart. The counts include the
benchmark's own projection matmuls where the step calls them (query always;
key/value and output when every row is recomputed, the recomputed-rows kernel
otherwise). Two tables: the first layer of a step (a forward of one layer), which
also makes the step's shared counters and buffers, and each further layer (a
forward of two layers minus that of one).

Host syncs: ATen ops whose result the host must read back from the device before
it can go on (``op_counter.SYNC_OPS``: a scalar read, ``nonzero``'s data-dependent size, ...).
Each one stops the host from queueing work until the GPU has caught up. The
per-step sync of ``DareRuntime.begin_step`` is outside the layer and not counted.

    .venv/bin/python benchmarks/dare_step_launches.py

Prints a table and writes JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
os.environ["VLLM_DARE_KERNELS"] = "triton"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from vllm_dare.tools.cli_args import HelpFormatter, positive_int  # noqa: E402
from vllm_dare.tools.op_counter import OpCounter, triton_launches_counted  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import dare_attention  # noqa: E402

def _count_forward(args, num_layers: int) -> dict[str, dict]:
    """Per setting, what one forward of ``num_layers`` attention layers launches."""
    stack_args = argparse.Namespace(shape="tiny", scope="attention", layers=num_layers,
                                    batch=args.batch, seq_len=args.seq_len, block_size=16,
                                    dtype="float32", reps=1)
    stack = dare_attention.Stack(stack_args, torch.device("cpu"), torch.float32)
    counter = OpCounter()
    g = torch.Generator().manual_seed(0)
    # label: (reused rows, predicted): the other rows forced (0%: a refresh step), or
    # nothing forced and the predictor finding every query changed
    settings = {"DARE mode off": (None, False)}
    for rate in args.reuse:
        n = int(round(rate * stack.T))
        label = f"reuse on, {rate:.0%} reused" + (", all forced" if n == 0 else "")
        settings[label] = (torch.randperm(stack.T, generator=g)[:n], False)
    settings["reuse on, 0% predicted"] = (torch.zeros(0, dtype=torch.long), True)
    counted = {}
    for label, (reuse_rows, predicted) in settings.items():
        x = stack.x * 1.5 if predicted else None  # queries unlike the cached Q_ref
        stack.dare(stack.runtime(reuse_rows))  # first step: caches filled
        runtime = stack.runtime(reuse_rows, predicted_none=predicted)
        counter.ops.clear()
        with triton_launches_counted(counter) as launches, counter:
            stack.dare(runtime, x)
        if predicted:
            assert not runtime.layer_counts[:, 1].any(), "the predictor reused rows"
        counted[label] = {"ops": counter.work, "kernels": dict(launches),
                          "views": counter.views, "syncs": counter.syncs}
    return counted


def _minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) - b.get(k, 0) for k in sorted(set(a) | set(b))
            if a.get(k, 0) != b.get(k, 0)}


def _row(label: str, c: dict) -> dict:
    return {"setting": label, "torch_ops": sum(c["ops"].values()),
            "triton_launches": sum(c["kernels"].values()),
            "launched": sum(c["ops"].values()) + sum(c["kernels"].values()),
            "view_ops": sum(c["views"].values()), "host_syncs": sum(c["syncs"].values()),
            "ops": c["ops"], "kernels": c["kernels"], "views": c["views"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=2, help="requests")
    parser.add_argument("--seq-len", type=positive_int, default=64, help="tokens per request")
    parser.add_argument("--reuse", type=float, nargs="+", default=[0.0, 0.87], help="fractions of rows reused")
    parser.add_argument("--out", default="benchmarks/results/dare_step_launches.json", help="JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    if os.environ["TRITON_INTERPRET"] != "1" or torch.cuda.is_available():
        raise SystemExit("runs on CPU under Triton's interpreter (counts, not times)")
    one, two = _count_forward(args, 1), _count_forward(args, 2)
    tables = {"first layer of a step": [_row(k, c) for k, c in one.items()],
              # the second layer's counts: two layers' minus one layer's
              "each further layer": [_row(k, {part: _minus(two[k][part], c[part])
                                              for part in c}) for k, c in one.items()]}
    print(f"One DARE layer step (Triton kernels), {args.batch} x {args.seq_len} tokens, "
          f"counts per layer incl. the projections")
    for title, rows in tables.items():
        print(f"{title + ':':<32} {'torch ops':>9} {'triton':>7} {'launched':>9} "
              f"{'syncs':>6} {'views':>6}")
        for r in rows:
            print(f"  {r['setting']:<30} {r['torch_ops']:>9} {r['triton_launches']:>7} "
                  f"{r['launched']:>9} {r['host_syncs']:>6} {r['view_ops']:>6}")
            print(f"      {r['ops']} {r['kernels']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "dare_step_launches", "batch": args.batch,
                               "seq_len": args.seq_len, "rows": tables["first layer of a step"],
                               "further_layer_rows": tables["each further layer"]},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
