"""Batch generation with ``LLM.generate`` on a diffusion model (exact mode).

    .venv/bin/python examples/batch_generate.py [--model PATH]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from vllm import LLM, SamplingParams  # noqa: E402

from vllm_dare.default_model import default_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=default_model_path())
    args = parser.parse_args()
    llm = LLM(model=args.model, max_model_len=512, enforce_eager=True)
    params = SamplingParams(
        max_tokens=64,
        extra_args={"dllm_steps": 64, "dllm_block_length": 32},  # LLaDA knobs
    )
    prompts = ["12+34=", "Sort: 9 3 7 1", "hello"]
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        print(f"{prompt!r} -> {out.outputs[0].text!r}")


if __name__ == "__main__":  # vLLM's CPU build spawns processes
    main()
