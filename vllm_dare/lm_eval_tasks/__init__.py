"""lm-eval task configs for the project's task set (see docs/evaluation.md)."""

from pathlib import Path

TASKS_DIR = str(Path(__file__).resolve().parent)
