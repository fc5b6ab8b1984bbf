"""The model vllm-dare serves when none is named: packaged with the project, so it
is found without network access.

For now a tiny random-weight LLaDA-architecture checkpoint in the official format
(``models/tiny-llada-random``, written by ``vllm_dare.tools.tiny_checkpoint`` with
seed 0); it exercises the whole serving path but its text is meaningless. The
trained default replaces it with its own issue.

    python -m vllm_dare.default_model   # prints the folder
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "tiny-llada-random"


def default_model_path() -> str:
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"packaged default model missing at {DEFAULT_MODEL_DIR}")
    return str(DEFAULT_MODEL_DIR)


if __name__ == "__main__":
    print(default_model_path())
