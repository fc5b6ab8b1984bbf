"""Checkable tasks the project trains on and evaluates every mode with.

Each example is a user message and its exact answer; prompts use the model's chat
template. Fixed-width inputs keep every prompt of a task the same length.

* ``add``   -- ``"047+385="`` -> ``"0432"`` (3-digit operands, carries; the sum is
  written with 4 digits so every answer digit sits at a fixed position)
* ``sort``  -- ``"sort 5 3 9 1 7 2 8 4"`` -> ``"1 2 3 4 5 7 8 9"``
* ``words`` -- ``"words 472"`` -> ``"four hundred seventy two"`` (templated language,
  answers up to 27 characters)

The held-out split is a fixed set drawn from its own seed; training never draws an
example whose prompt is in it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
         "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    gen_length: int  # answer budget in tokens (answer + EOS padding)


TASKS = {
    "add": TaskSpec("add", 8),
    "sort": TaskSpec("sort", 16),
    "words": TaskSpec("words", 32),
}


@dataclass(frozen=True)
class Example:
    task: str
    question: str
    answer: str


def number_to_words(n: int) -> str:
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])
    hundreds, rest = divmod(n, 100)
    head = ONES[hundreds] + " hundred"
    return head if rest == 0 else head + " " + number_to_words(rest)


def make_example(task: str, rng: random.Random) -> Example:
    if task == "add":
        a, b = rng.randrange(1000), rng.randrange(1000)
        return Example(task, f"{a:03d}+{b:03d}=", f"{a + b:04d}")
    if task == "sort":
        digits = [rng.randrange(10) for _ in range(8)]
        return Example(
            task,
            "sort " + " ".join(map(str, digits)),
            " ".join(map(str, sorted(digits))),
        )
    if task == "words":
        n = rng.randrange(1000)
        return Example(task, f"words {n:03d}", number_to_words(n))
    raise ValueError(f"unknown task {task!r}")


HELD_OUT_PER_TASK = 200


def held_out_scope(n: int) -> str:
    """How much of the held-out split the first ``n`` examples per task are."""
    if n >= HELD_OUT_PER_TASK:
        return f"all {HELD_OUT_PER_TASK} held-out examples per task"
    return f"the first {n} held-out examples per task"


def held_out(task: str, n: int = HELD_OUT_PER_TASK, seed: int = 1234) -> list[Example]:
    """The evaluation split: n distinct examples of ``task``."""
    rng = random.Random(f"{seed}-{task}-heldout")
    seen: dict[str, Example] = {}
    while len(seen) < n:
        ex = make_example(task, rng)
        seen.setdefault(ex.question, ex)
    return list(seen.values())


def is_correct(example: Example, output_text: str) -> bool:
    return output_text.strip() == example.answer
