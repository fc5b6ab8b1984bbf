"""The model vllm-dare serves when none is named: packaged with the project, so it
is found without network access.

``models/llada-tasks``: a small LLaDA-architecture model trained by
``vllm_dare.training.train`` on the project's task set (addition, sorting, number
words), official config schema, weight names and chat template. Its model card is
``models/llada-tasks/README.md``. The Dream-architecture sibling is
``packaged_model_path("dream-tasks")``.

    python -m vllm_dare.default_model   # prints the folder
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL_DIR = MODELS_DIR / "llada-tasks"


def packaged_model_path(name: str) -> str:
    """Folder of a model packaged in ``vllm_dare/models``."""
    path = MODELS_DIR / name
    if not (path / "config.json").exists():
        known = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").exists())
        raise FileNotFoundError(f"no packaged model {name!r} in {MODELS_DIR}; packaged: {known}")
    return str(path)


def default_model_path() -> str:
    return packaged_model_path(DEFAULT_MODEL_DIR.name)


if __name__ == "__main__":
    print(default_model_path())
