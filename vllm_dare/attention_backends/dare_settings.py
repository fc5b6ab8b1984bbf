"""DARE knobs: engine defaults (``--additional-config '{"dare": {...}}'``) and
per-request overrides (``SamplingParams.extra_args``: ``dare_mode``, ``dare_tau_kv``,
``dare_tau_o``, ``dare_refresh_interval``, ``dare_recompute_candidates``,
``dare_candidate_limit``).

* ``mode`` -- ``off`` (recompute everything; equals exact mode), ``kv`` (reuse
  keys/values), ``o`` (reuse attention outputs), ``kv+o`` (both).
* ``tau_kv`` / ``tau_o`` -- reuse a token's K/V (O) when its query delta is at most
  this; 0 disables that reuse.
* ``refresh_interval`` -- recompute every token every N denoising steps (0: never);
  LLaDA also refreshes at every block start when ``refresh_at_block_start``.
* ``recompute_candidates`` -- always recompute the still-masked positions whose
  logits this step's unmasking choice reads (LLaDA: the current block; Dream: every
  masked position), i.e. the hidden rows those logits come from.
* ``candidate_limit`` -- with ``recompute_candidates``, recompute only the N
  candidates the previous step ranked most confident (0: all of them).
* ``per_head`` (engine only) -- use the largest per-head delta instead of the
  delta over all heads of the token.
* ``max_mode`` (engine only) -- the most any request of this engine may reuse, which
  sizes its cache: ``kv+o`` (default; K, V, O and Q_ref rows: every mode), ``kv``
  (K, V, Q_ref: modes off and kv), ``o`` (modes off and o; same rows as kv+o),
  ``off`` (K and V only, as much KV-cache capacity as the exact path).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

MODES = ("off", "kv", "o", "kv+o")
REQUEST_KEYS = ("dare_mode", "dare_tau_kv", "dare_tau_o", "dare_refresh_interval",
                "dare_recompute_candidates", "dare_candidate_limit")
ENGINE_KEYS = ("mode", "tau_kv", "tau_o", "refresh_interval", "refresh_at_block_start",
               "recompute_candidates", "candidate_limit", "per_head", "max_mode")
# The modes an engine of each max_mode serves.
ALLOWED_MODES = {"kv+o": MODES, "kv": ("off", "kv"), "o": ("off", "o"), "off": ("off",)}


@dataclass(frozen=True)
class DareSettings:
    mode: str = "kv+o"
    tau_kv: float = 0.05
    tau_o: float = 0.05
    refresh_interval: int = 0
    refresh_at_block_start: bool = True
    recompute_candidates: bool = False
    candidate_limit: int = 0
    per_head: bool = False
    max_mode: str = "kv+o"

    @property
    def reuses_kv(self) -> bool:
        return self.mode in ("kv", "kv+o") and self.tau_kv > 0

    @property
    def reuses_o(self) -> bool:
        return self.mode in ("o", "kv+o") and self.tau_o > 0

    def check(self) -> DareSettings:
        if self.max_mode not in MODES:
            raise ValueError(f"dare max_mode must be one of {', '.join(MODES)}, got "
                             f"{self.max_mode!r}")
        if self.mode not in MODES:
            raise ValueError(f"dare mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode not in ALLOWED_MODES[self.max_mode]:
            raise ValueError(
                f"dare mode {self.mode!r} needs a DARE cache this engine does not keep "
                f"(started with max_mode {self.max_mode!r}, which serves modes "
                f"{', '.join(ALLOWED_MODES[self.max_mode])})"
            )
        for name in ("tau_kv", "tau_o"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"dare {name} must be a number >= 0, got {value!r}")
        if (isinstance(self.refresh_interval, bool) or not isinstance(self.refresh_interval, int)
                or self.refresh_interval < 0):
            raise ValueError(
                f"dare refresh_interval must be an integer >= 0, got {self.refresh_interval!r}"
            )
        for name in ("refresh_at_block_start", "recompute_candidates", "per_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"dare {name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        limit = self.candidate_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"dare candidate_limit must be an integer >= 0, got {limit!r}")
        if limit and not self.recompute_candidates:
            raise ValueError("dare candidate_limit limits recompute_candidates, which is off; "
                             "turn it on or leave candidate_limit at 0")
        return self

    @classmethod
    def from_engine_config(cls, raw: dict[str, Any] | None) -> DareSettings:
        raw = dict(raw or {})
        if "max_mode" in raw and "mode" not in raw:
            raw["mode"] = raw["max_mode"]  # the default mode: the most the cache allows
        unknown = set(raw) - set(ENGINE_KEYS)
        if unknown:
            raise ValueError(
                f"unknown DARE setting(s) {sorted(unknown)} in additional_config['dare']; "
                f"known: {', '.join(ENGINE_KEYS)}"
            )
        return cls(**raw).check()

    @classmethod
    def parse_fixed_engine_settings(cls, text: str) -> dict[str, Any]:
        """A JSON object of engine-level settings other than ``mode``/``tau_kv``/
        ``tau_o`` (which a sweep varies), checked like an engine config; for the
        ``--dare-engine-config`` option of the harness and the calibration tool."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"must be a JSON object, got {text!r}")
        swept = sorted({"mode", "tau_kv", "tau_o"} & set(raw))
        if swept:
            raise ValueError(f"must not set {', '.join(swept)} (the modes / thresholds "
                             "being measured set those)")
        cls.from_engine_config(raw)  # unknown keys and bad values
        return raw

    def for_request(self, extra_args: dict[str, Any] | None) -> DareSettings:
        """This engine's settings with the request's ``dare_*`` overrides."""
        extra = extra_args or {}
        overrides = {}
        for key, value in extra.items():
            if not key.startswith("dare_"):
                continue
            if key not in REQUEST_KEYS:
                raise ValueError(
                    f"unknown DARE knob {key!r}; known: {', '.join(REQUEST_KEYS)}"
                )
            overrides[key.removeprefix("dare_")] = value
        return replace(self, **overrides).check() if overrides else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_engine_settings_arg(text: str) -> dict[str, Any]:
    """``argparse`` type of ``--dare-engine-config`` (harness, calibration tool):
    ``DareSettings.parse_fixed_engine_settings`` with its message as the error."""
    try:
        return DareSettings.parse_fixed_engine_settings(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
