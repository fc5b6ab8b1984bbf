"""``argparse`` pieces shared by the project's tools and benchmark scripts: a help
formatter that shows defaults, and argument types whose errors name the value."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """The description as it is written, and the default of every option whose
    default is a value (an unset option's help says what unset means)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.help is None:
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def number_in(low: float, high: float | None = None):
    """A float in [low, high] (no upper bound when ``high`` is None)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value >= low and (high is None or value <= high)):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}")
        return value
    return parse
