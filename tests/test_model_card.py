"""The model card renders every training stage of a continued checkpoint, in order,
with its command rewritten to the packaged folder, and the total training time."""

from __future__ import annotations

import json
import shlex

import pytest

from vllm_dare.training.model_card import packaged_command, render, training_threads
from vllm_dare.training.train import DEFAULT_THREADS


def _stage(command: str, steps: int, minutes: float, acc: float, previous=None) -> dict:
    stage = {
        "family": "llada", "seed": 0, "steps": steps, "train_minutes": minutes,
        "size": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": None,
                 "intermediate_size": 32, "vocab_size": 128, "max_length": 64},
        "parameters": 12345,
        "heldout_exact_accuracy_reference_fp32": {"add": acc, "sort": acc, "words": acc},
        "decoding": "greedy", "command": command,
    }
    if previous is not None:
        stage["continued_from"] = previous
    return stage


def test_card_lists_stages_in_order_with_total(tmp_path):
    model_dir = tmp_path / "llada-tasks"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"mask_token_id": 2, "vocab_size": 128}))
    first = _stage("python -m vllm_dare.training.train llada /tmp/a --steps 100", 100, 30.5, 0.5)
    second = _stage("python -m vllm_dare.training.train llada /tmp/b --init-from /tmp/a "
                    "--steps 40", 40, 10.0, 0.95, previous=first)
    (model_dir / "training.json").write_text(json.dumps(second))
    card = render(model_dir, None, "on a test machine")
    assert card.startswith("# llada-tasks")
    one, two = card.index("Stage 1:"), card.index("Stage 2 (continues")
    assert one < two
    assert "100 steps, 30.5 minutes on a test machine" in card[one:two]
    assert "add 95.0%" in card[two:]
    assert "2 stages, 40.5 minutes of training in all." in card
    assert "not bitwise reproducible" in card


def test_one_thread_training_is_called_reproducible(tmp_path):
    model_dir = tmp_path / "llada-tasks"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"mask_token_id": 2, "vocab_size": 128}))
    stage = _stage("python -m vllm_dare.training.train llada /tmp/a --threads 1 --compile",
                   10, 1.0, 0.9)
    (model_dir / "training.json").write_text(json.dumps(stage))
    card = render(model_dir, None, "here")
    assert "Reproducible from the seed (one thread" in card
    assert "not bitwise reproducible" not in card
    stage["command"] = stage["command"].replace("--threads 1", "--threads 12")
    (model_dir / "training.json").write_text(json.dumps(stage))
    assert "not bitwise reproducible" in render(model_dir, None, "here")


def test_deterministic_training_is_called_bitwise_reproducible(tmp_path):
    model_dir = tmp_path / "llada-tasks"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"mask_token_id": 2, "vocab_size": 128}))
    first = _stage("python -m vllm_dare.training.train llada /tmp/a --threads 2", 10, 1.0, 0.5)
    second = _stage("python -m vllm_dare.training.train llada /tmp/b --init-from /tmp/a",
                    10, 1.0, 0.9, previous=first)
    second["deterministic_algorithms"] = True
    second["accuracy_on"] = "the first 7 held-out examples per task"
    (model_dir / "training.json").write_text(json.dumps(second))
    # A stage trained before deterministic mode (no record) makes the whole card not so.
    card = render(model_dir, None, "here")
    assert "not bitwise reproducible" in card and "Bitwise reproducible" not in card
    first["deterministic_algorithms"] = True
    (model_dir / "training.json").write_text(json.dumps(second))
    card = render(model_dir, None, "here")
    assert "Bitwise reproducible from the seed" in card
    assert "not bitwise reproducible" not in card
    assert "the first 7 held-out examples per task" in card


def test_training_threads_reads_the_recorded_command():
    assert training_threads("python -m x llada /o --threads 12 --compile") == 12
    assert training_threads("python -m x llada /o --threads 1") == 1
    assert training_threads("python -m x llada /o --threads=3 --task-weights '{\"a\": 1}'") == 3
    assert training_threads("python -m x llada /o --steps 5") == DEFAULT_THREADS


def test_single_stage_card_has_no_total(tmp_path):
    model_dir = tmp_path / "llada-tasks"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"mask_token_id": 2, "vocab_size": 128}))
    stage = _stage("python -m vllm_dare.training.train llada /tmp/a --compile", 10, 1.0, 0.9)
    (model_dir / "training.json").write_text(json.dumps(stage))
    card = render(model_dir, None, "here")
    assert "10 steps, 1.0 minutes here" in card
    assert "minutes of training in all" not in card


def test_packaged_command_points_at_the_packaged_folder(tmp_path):
    command = ("python -m vllm_dare.training.train dream /x/out --init-from /x/prev "
               "--task-weights {\"add\": 2}")
    out = packaged_command(command, tmp_path / "dream-tasks")
    assert "/x/" not in out
    assert out.count("vllm_dare/models/dream-tasks") == 2
    assert "--task-weights '{\"add\": 2}'" in out


@pytest.mark.parametrize("command", [
    # as train.py records it now, and as it recorded it before
    "python -m vllm_dare.training.train dream /x/out --task-weights '{\"add\": 2}' --steps 4",
    "'python -m vllm_dare.training.train' dream /x/out --task-weights '{\"add\": 2}' --steps 4",
])
def test_packaged_command_is_a_shell_command(tmp_path, command):
    out = packaged_command(command, tmp_path / "dream-tasks")
    assert shlex.split(out) == ["python", "-m", "vllm_dare.training.train", "dream",
                                "vllm_dare/models/dream-tasks", "--task-weights",
                                '{"add": 2}', "--steps", "4"]
