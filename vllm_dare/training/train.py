"""Train a small LLaDA- or Dream-architecture model on the project's tasks.

Masked-diffusion objective (LLaDA SFT): per sequence a mask ratio t ~ U(eps, 1);
every answer position (answer + EOS padding) is replaced by [MASK] with probability
t; the loss is the cross-entropy on masked positions weighted by 1/t, averaged over
answer positions. Prompt tokens are never masked. Dream reads position i's logits
from hidden state i-1 (the reference forward applies that shift), so the same
objective trains Dream's shifted head.

The model is the pure-PyTorch reference (``vllm_dare.reference``) over tensors with
the official checkpoint names, so the result is written with
``vllm_dare.tools.tiny_checkpoint.write_checkpoint`` and loads in vLLM through the
same code path as LLaDA-8B / Dream-7B. Reproducible from ``--seed``.

    python -m vllm_dare.training.train llada vllm_dare/models/llada-tasks
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import time
from pathlib import Path

import torch

from vllm_dare.reference.generation import dream_generate, llada_generate
from vllm_dare.reference.modeling import ArchSpec, ReferenceDLLM
from vllm_dare.tools.tiny_checkpoint import (
    TinySize,
    build_config,
    random_weights,
    write_checkpoint,
    write_tokenizer,
)
from vllm_dare.training.tasks import (
    HELD_OUT_PER_TASK, TASKS, Example, held_out, held_out_scope, is_correct, make_example,
)


def chat_tokenizer(family: str, workdir: Path):
    from transformers import PreTrainedTokenizerFast

    write_tokenizer(family, workdir)
    return PreTrainedTokenizerFast.from_pretrained(str(workdir))


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )


def answer_ids(tokenizer, answer: str, gen_length: int) -> list[int]:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    assert len(ids) < gen_length, (answer, gen_length)
    return ids + [tokenizer.eos_token_id] * (gen_length - len(ids))


def make_batch(tokenizer, task: str, batch: int, rng: random.Random, exclude: set[str]):
    spec = TASKS[task]
    prompts, answers = [], []
    while len(prompts) < batch:
        ex = make_example(task, rng)
        if ex.question in exclude:
            continue
        prompts.append(prompt_ids(tokenizer, ex.question))
        answers.append(answer_ids(tokenizer, ex.answer, spec.gen_length))
    return torch.tensor(prompts), torch.tensor(answers)


def diffusion_loss(model: ReferenceDLLM, prompts, answers, mask_id: int, gen: torch.Generator,
                   forward=None):
    """``forward``: the logits function to train through (default
    ``model.forward_logits``; the training loop may pass a compiled one)."""
    forward = forward or model.forward_logits
    B, P = prompts.shape
    L = answers.shape[1]
    t = torch.rand(B, 1, generator=gen) * (1 - 1e-3) + 1e-3
    masked = torch.rand(B, L, generator=gen) < t
    noisy = torch.where(masked, torch.full_like(answers, mask_id), answers)
    logits = forward(torch.cat([prompts, noisy], dim=1))[:, P:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), answers.reshape(-1), reduction="none"
    ).view(B, L)
    return ((ce * masked) / t).sum() / (B * L)


def decode_answer(tokenizer, canvas: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos in canvas:
        canvas = canvas[: canvas.index(eos)]
    return tokenizer.decode(canvas, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model: ReferenceDLLM, tokenizer, family: str, examples: list[Example]) -> float:
    """Exact-mode accuracy with the reference generation (one token per step)."""
    correct = 0
    for ex in examples:
        L = TASKS[ex.task].gen_length
        ids = prompt_ids(tokenizer, ex.question)
        if family == "llada":
            canvas = llada_generate(model.logits, ids, model.spec.mask_token_id, L, L, min(L, 8))
        else:
            canvas = dream_generate(model.logits, ids, model.spec.mask_token_id, L, L,
                                    alg="maskgit_plus")
        correct += is_correct(ex, decode_answer(tokenizer, canvas))
    return correct / len(examples)


@contextlib.contextmanager
def reproducible_torch(threads: int):
    """Run with ``threads`` intra-op threads and PyTorch's deterministic algorithms,
    restoring both afterwards.

    With more than one thread, the CPU backward of the embedding lookup (``index_put_``
    with ``accumulate=True``) otherwise adds its rows with atomic float adds, in
    whatever order the threads get there, so two runs from one seed drift apart.
    Deterministic mode makes that kernel serial; the training step time is unchanged
    (measured on the llada-tasks recipe: 0.21 s per step either way)."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def train(args) -> None:
    """Bitwise reproducible for a given seed and ``--threads`` on one machine."""
    with reproducible_torch(args.threads):
        _train(args)


def _train(args) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = chat_tokenizer(args.family, workdir)

    size = TinySize(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        max_length=512,
    )
    config = build_config(args.family, size)
    weights = {k: v.float().requires_grad_() for k, v in
               random_weights(args.family, config, args.seed, torch.float32).items()}
    # Standard init scale for training (the random test weights are spread wider).
    with torch.no_grad():
        for name, w in weights.items():
            if w.dim() == 2:
                w.mul_(0.5 if ("wte" in name or "embed" in name) else 1.0)
    if args.init_from:
        # Continue from a checkpoint written by this script (same size and family).
        from safetensors.torch import load_file

        start_weights = load_file(str(Path(args.init_from) / "model.safetensors"))
        if set(start_weights) != set(weights):
            raise SystemExit(f"{args.init_from}: tensors differ from a {args.family} model "
                             "of the requested size")
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(start_weights[name].float())
    model = ReferenceDLLM(ArchSpec.from_config(config), weights)
    params = list(weights.values())
    print(f"{args.family}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=warmup_fraction(args.steps)
    )
    heldout = {task: held_out(task) for task in TASKS}
    exclude = {ex.question for exs in heldout.values() for ex in exs}
    task_names = list(TASKS)
    log = []
    start = time.time()
    accuracy: dict[str, float] = {}
    weights_by_task = [args.task_weights.get(t, 1.0) for t in task_names]
    # Training-only speed-ups (evaluation always runs the fp32 reference as is):
    # a compiled forward (one graph per task's sequence length) and bf16 matmuls
    # under CPU autocast with fp32 master weights. On a 2-core AVX512-BF16 CPU the
    # two together halve the step time.
    forward = (torch.compile(model.forward_logits, dynamic=False) if args.compile
               else model.forward_logits)
    for step in range(1, args.steps + 1):
        task = rng.choices(task_names, weights=weights_by_task)[0]
        prompts, answers = make_batch(tokenizer, task, args.batch, rng, exclude)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            loss = diffusion_loss(model, prompts, answers, config["mask_token_id"], gen,
                                  forward)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            accuracy = {t: evaluate(model, tokenizer, args.family, heldout[t][: args.eval_n])
                        for t in task_names}
            log.append({"step": step, "seconds": round(time.time() - start), **accuracy})
            print("eval", json.dumps(log[-1]), flush=True)
            save(workdir, args, size, weights, params, log, accuracy, start, final=False)
            if step >= args.min_steps and min(accuracy.values()) >= args.target:
                break
    # Final numbers on the whole held-out split (or its first --final-eval-n per task).
    accuracy = {t: evaluate(model, tokenizer, args.family, heldout[t][: args.final_eval_n])
                for t in task_names}
    save(workdir, args, size, weights, params, log, accuracy, start, final=True)
    print("final", json.dumps(accuracy))


# The task models are served with the algorithm their accuracy is measured with: Dream's
# official file says alg "origin" and steps 512; here steps default to the generation length.
SERVING_GENERATION_OVERRIDES = {"dream": {"alg": "maskgit_plus", "steps": None}}

# OneCycleLR's warm-up phase lasts WARMUP_FRACTION * steps - 1 scheduler steps and it
# divides by that length, so it must not be exactly 0 (e.g. --steps 20).
WARMUP_FRACTION = 0.05
DEFAULT_THREADS = 2
TRAIN_COMMAND = "python -m vllm_dare.training.train"


def warmup_fraction(steps: int) -> float:
    if WARMUP_FRACTION * steps == 1:
        return 2 / steps
    return WARMUP_FRACTION


def save(workdir, args, size, weights, params, log, accuracy, start, final: bool) -> None:
    """Write the checkpoint (bf16, official names) and its training card."""
    final_weights = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in weights.items()}
    write_checkpoint(workdir, args.family, size, weights=final_weights,
                     generation_overrides=SERVING_GENERATION_OVERRIDES.get(args.family))
    card = {
        "family": args.family, "seed": args.seed, "steps": log[-1]["step"] if log else 0,
        "train_minutes": round((time.time() - start) / 60, 1), "size": size.__dict__,
        "parameters": sum(p.numel() for p in params),
        "heldout_exact_accuracy_reference_fp32": accuracy,
        "accuracy_on": held_out_scope(args.final_eval_n) if final
        else f"the first {args.eval_n} held-out examples per task (training in progress)",
        "decoding": "greedy; LLaDA low_confidence, steps = gen_length, block 8; "
                    "Dream maskgit_plus, steps = gen_length",
        "gen_length": {t: s.gen_length for t, s in TASKS.items()},
        "task_weights": args.task_weights,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "log": log, "command": TRAIN_COMMAND + " " + shlex.join(args.argv),
    }
    if args.init_from:
        prev = json.loads((Path(args.init_from) / "training.json").read_text())
        card["continued_from"] = {k: prev[k] for k in (
            "command", "steps", "train_minutes", "heldout_exact_accuracy_reference_fp32",
            "continued_from") if k in prev}
    (workdir / "training.json").write_text(json.dumps(card, indent=2) + "\n")


def count(text: str) -> int:
    """argparse type of every size, step and example count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def task_weights(text: str) -> dict[str, float]:
    """argparse type of --task-weights: a JSON object from task names to positive
    sampling weights (tasks left out weigh 1)."""
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(weights, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"add": 2}\'')
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {', '.join(unknown)}; tasks are {', '.join(TASKS)}")
    for task, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise argparse.ArgumentTypeError(
                f"the weight of {task} must be a positive number, got {weight!r}")
    return weights


def main(argv=None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=["llada", "dream"])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=count, default=6000)
    parser.add_argument("--min-steps", type=int, default=0)
    parser.add_argument("--batch", type=count, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden-size", type=count, default=192)
    parser.add_argument("--layers", type=count, default=4)
    parser.add_argument("--heads", type=count, default=6)
    parser.add_argument("--kv-heads", type=count, default=None)
    parser.add_argument("--intermediate-size", type=count, default=512)
    parser.add_argument("--eval-every", type=count, default=500)
    parser.add_argument("--eval-n", type=count, default=50)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--final-eval-n", type=count, default=HELD_OUT_PER_TASK,
                        help="held-out examples per task for the final accuracy in the "
                             f"model card (default: the whole split, {HELD_OUT_PER_TASK})")
    parser.add_argument("--threads", type=count, default=DEFAULT_THREADS)
    parser.add_argument("--bf16-autocast", action="store_true",
                        help="train with bf16 matmuls (CPU autocast; fp32 master weights)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training forward (needs a C++ compiler)")
    parser.add_argument("--init-from", default=None,
                        help="checkpoint folder written by this script to continue from")
    parser.add_argument("--task-weights", type=task_weights, default={},
                        help='sampling weight per task, e.g. \'{"add": 3}\' (default 1 each)')
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    train(args)


if __name__ == "__main__":
    main()
