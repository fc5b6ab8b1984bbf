"""Write the model card (README.md) of a trained checkpoint.

Reads the checkpoint's ``config.json`` and ``training.json`` (written by
``vllm_dare.training.train``) and, optionally, a ``benchmarks/quality_speed.py``
report on the same checkpoint, whose exact-mode row is the held-out accuracy through
the vLLM engine:

    python -m vllm_dare.training.model_card vllm_dare/models/llada-tasks \\
        --harness benchmarks/results/quality_speed_llada-tasks.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from vllm_dare.training.tasks import HELD_OUT_PER_TASK, TASKS, held_out, held_out_scope
from vllm_dare.training.train import DEFAULT_THREADS

DESCRIPTIONS = {
    "add": "3-digit addition with carries, the sum written with 4 digits",
    "sort": "sort a list of 8 digits",
    "words": "spell a number 0-999 in English words (answers up to 27 characters)",
}


def packaged_command(command: str, model_dir: Path) -> str:
    """The training command as a user reruns it: the output folder becomes the
    packaged one and JSON arguments are quoted for the shell."""
    command = re.sub(r"--task-weights (\{[^}]*\})", lambda m: "--task-weights " + shlex.quote(
        m.group(1)), command)
    # Older records quoted the module call as one word: 'python -m ...'.
    command = command.replace("'python -m vllm_dare.training.train'",
                              "python -m vllm_dare.training.train")
    parts = command.split(" ")
    target = f"vllm_dare/models/{model_dir.name}"
    return " ".join(target if p.startswith("/") else p for p in parts)


def training_threads(command: str) -> int:
    """The ``--threads`` a recorded training command ran with."""
    parts = shlex.split(command)
    for i, part in enumerate(parts):
        if part.startswith("--threads="):
            return int(part.split("=", 1)[1])
        if part == "--threads" and i + 1 < len(parts):
            return int(parts[i + 1])
    return DEFAULT_THREADS


def render(model_dir: Path, harness: dict | None, machine_note: str) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    card = json.loads((model_dir / "training.json").read_text())
    family = card["family"]
    size = card["size"]
    arch = "LLaDA (`LLaDAModelLM`)" if family == "llada" else "Dream (`DreamModel`)"
    lines = [
        f"# {model_dir.name}",
        "",
        f"A small {arch}-architecture masked-diffusion language model trained by "
        "vllm-dare on its own generated tasks, so that the quality cost of every "
        "acceleration mode can be measured on weights that learned something. Same "
        "config schema, weight names and chat template as the official "
        f"{'LLaDA-8B-Instruct' if family == 'llada' else 'Dream-v0-Instruct-7B'} "
        "release; it loads through the same code path.",
        "",
        "## Architecture",
        "",
        f"- {card['parameters'] / 1e6:.2f} M parameters, weights in bfloat16 "
        "(`model.safetensors`, official tensor names)",
        f"- hidden {size['hidden_size']}, {size['num_layers']} layers, "
        f"{size['num_heads']} attention heads ({size.get('num_kv_heads') or size['num_heads']} "
        f"K/V heads), SwiGLU {size['intermediate_size']}, RoPE, RMSNorm, "
        "bidirectional attention",
        f"- character-level `tokenizer.json` with the official special tokens; "
        f"{config.get('embedding_size') or config.get('vocab_size')} embedding rows; "
        f"mask token id "
        f"{config['mask_token_id']}",
        "",
        "## Tasks (prompts in the chat format)",
        "",
        "| task | description | example prompt | answer | generation length |",
        "|---|---|---|---|---|",
    ]
    for task, spec in TASKS.items():
        ex = held_out(task)[0]
        lines.append(f"| {task} | {DESCRIPTIONS[task]} | `{ex.question}` | `{ex.answer}` | "
                     f"{spec.gen_length} |")
    lines += [
        "",
        f"The held-out split (`vllm_dare.training.tasks.held_out`, {HELD_OUT_PER_TASK} "
        "examples per task, its own seed) is never drawn for training.",
        "",
        "## Training",
        "",
        "Masked-diffusion objective (mask ratio t ~ U(1e-3, 1) per sequence over the "
        "answer and its EOS padding, cross-entropy on masked positions weighted by 1/t"
        + ("; Dream's one-position logit shift" if family == "dream" else "")
        + "), AdamW with a one-cycle schedule.",
    ]
    stages = []
    prev = card.get("continued_from")
    while prev is not None:
        stages.insert(0, prev)
        prev = prev.get("continued_from")
    stages.append(card)
    if all(stage.get("deterministic_algorithms") for stage in stages):
        lines[-1] += (
            " Bitwise reproducible from the seed: PyTorch's deterministic algorithms are "
            "on, so a rerun with the same command and `--threads` on the same kind of CPU "
            "writes identical weights (docs/evaluation.md, Training time).")
    elif all(training_threads(stage["command"]) == 1 for stage in stages):
        lines[-1] += " Reproducible from the seed (one thread: bitwise identical reruns)."
    else:
        lines[-1] += (
            " Data order, masks and initialisation follow the seed, but with more than "
            "one thread the training arithmetic is not bitwise reproducible on CPU, so "
            "the same command can take a different trajectory; with `--threads 1` it is "
            "(docs/evaluation.md, Training time).")
    for i, stage in enumerate(stages):
        if len(stages) > 1:
            lines += ["", f"Stage {i + 1}" + (" (continues from the previous stage's "
                                              "checkpoint):" if i else ":")]
        acc = stage["heldout_exact_accuracy_reference_fp32"]
        lines += [
            "",
            "```bash",
            stage["command"],
            "```",
            "",
            f"{stage['steps']} steps, {stage['train_minutes']} minutes {machine_note}; "
            "held-out accuracy after it: "
            + ", ".join(f"{t} {100 * acc[t]:.1f}%" for t in TASKS) + ".",
        ]
    if len(stages) > 1:
        total = sum(stage["train_minutes"] for stage in stages)
        lines += ["", f"{len(stages)} stages, {total:.1f} minutes of training in all."]
    lines += [
        "",
        "## Held-out accuracy, exact mode (greedy)",
        "",
    ]
    ref = card["heldout_exact_accuracy_reference_fp32"]
    header = "| decoding | " + " | ".join(TASKS) + " |"
    lines += [header, "|---" * (len(TASKS) + 1) + "|"]
    lines.append(
        f"| pure-PyTorch reference on the fp32 training weights ({card['decoding']}; "
        f"{card.get('accuracy_on', 'the full held-out split')}) | "
        + " | ".join(f"{100 * ref[t]:.1f}%" for t in TASKS) + " |"
    )
    if harness is not None:
        exact = harness["rows"][0]
        assert exact["mode"] == "exact"
        s = harness["settings"]
        blk = s.get("block_length")
        how = (f"vLLM engine on the shipped bf16 weights (computing in {s['dtype']}, "
               f"{s['hardware']}), steps = generation length"
               + (f", block {blk}" if blk else "")
               + (f", alg {s['dream_alg']}" if s.get("dream_alg") else "")
               + "; " + held_out_scope(min(v["requests"] for v in s["tasks"].values())))
        lines.append(
            f"| {how} | "
            + " | ".join(f"{100 * exact['tasks'][t]['accuracy']:.1f}%" for t in TASKS) + " |"
        )
    lines += [
        "",
        "Every mode's accuracy, speed and reuse on this model: `docs/evaluation.md`.",
        "",
        "## Limits",
        "",
        "A toy: it knows these three tasks in this exact format and nothing else. It exists "
        "to measure caches and serving, not to be useful as a language model.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--harness", help="quality_speed report JSON on this checkpoint")
    parser.add_argument("--machine-note", default="on a 2-core x86_64 CPU (torch CPU, one thread)",
                        help="where and how it was trained, for the card")
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    harness = json.loads(Path(args.harness).read_text()) if args.harness else None
    card_path = model_dir / "training.json"
    card = json.loads(card_path.read_text())
    stage = card
    while stage is not None:
        stage["command"] = packaged_command(stage["command"], model_dir)
        stage = stage.get("continued_from")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (model_dir / "README.md").write_text(render(model_dir, harness, args.machine_note))
    print(f"wrote {model_dir / 'README.md'}")


if __name__ == "__main__":
    main()
