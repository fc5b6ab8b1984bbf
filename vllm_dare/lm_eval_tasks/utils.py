"""Held-out splits of the project's tasks for lm-eval (``custom_dataset``).

Each document carries the user message rendered with the served model's chat
template (``prompt``), so lm-eval's ``local-completions`` model sends exactly what the
chat endpoint would. The tokenizer comes from ``--metadata '{"model_path": DIR}'``
(the served checkpoint); without it, the packaged default model's.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_path)


def _split(task: str, model_path: str | None = None, limit: int | None = None, **_):
    import datasets

    from vllm_dare.default_model import default_model_path
    from vllm_dare.training.tasks import held_out

    tok = _tokenizer(model_path or default_model_path())
    examples = held_out(task)[: limit or None]
    rows = {
        "question": [ex.question for ex in examples],
        "answer": [ex.answer for ex in examples],
        "prompt": [
            tok.apply_chat_template([{"role": "user", "content": ex.question}],
                                    add_generation_prompt=True, tokenize=False)
            for ex in examples
        ],
    }
    return {"test": datasets.Dataset.from_dict(rows)}


def add_split(**kwargs):
    return _split("add", **kwargs)


def sort_split(**kwargs):
    return _split("sort", **kwargs)


def words_split(**kwargs):
    return _split("words", **kwargs)
