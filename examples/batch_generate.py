"""Batch generation with ``LLM.generate`` on a diffusion model (exact mode).

Asks the packaged default model (or --model PATH, a model trained on the same
tasks) the first held-out questions of each of its tasks in one batch, in the
model's own format (its chat template) and with its settings (the task's
generation length, blocks of 8 tokens, one token per step), and prints each
answer next to the expected one. Exits non-zero if an answer is wrong.

    .venv/bin/python examples/batch_generate.py [--model PATH] [--per-task N]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU build: KV cache in GiB

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_dare.default_model import default_model_path  # noqa: E402
from vllm_dare.vllm_compat import shutdown_llm  # noqa: E402
from vllm_dare.training.tasks import TASKS, held_out, is_correct  # noqa: E402

BLOCK_LENGTH = 8  # the block length the packaged models were evaluated with


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=default_model_path(),
                        help="model folder (default: the packaged default model)")
    parser.add_argument("--per-task", type=int, default=3,
                        help="held-out questions per task")
    args = parser.parse_args()
    if args.per_task < 1:
        parser.error("--per-task must be at least 1")

    llm = LLM(model=args.model, max_model_len=256)
    tokenizer = llm.get_tokenizer()
    examples, prompts, params = [], [], []
    for task, spec in TASKS.items():
        for ex in held_out(task, args.per_task):
            examples.append(ex)
            # The model's chat template, as the OpenAI chat endpoint applies it.
            prompts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": ex.question}],
                tokenize=False, add_generation_prompt=True))
            params.append(SamplingParams(
                max_tokens=spec.gen_length,
                extra_args={"dllm_steps": spec.gen_length,
                            "dllm_block_length": BLOCK_LENGTH}))
    wrong = 0
    for ex, out in zip(examples, llm.generate(prompts, params, use_tqdm=False)):
        answer = out.outputs[0].text
        ok = is_correct(ex, answer)
        wrong += not ok
        print(f"[{ex.task}] {ex.question!r} -> {answer!r} "
              f"({'correct' if ok else 'WRONG, expected ' + repr(ex.answer)})")
    print(f"{len(examples) - wrong} of {len(examples)} answers correct")
    # A quiet exit: vLLM's own clean-up of an LLM gives its engine process 5 s,
    # less than the CPU build needs to tear down (docs/usage.md).
    shutdown_llm(llm)
    if wrong:
        sys.exit(1)


if __name__ == "__main__":  # vLLM's CPU build spawns processes
    main()
