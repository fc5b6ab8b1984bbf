"""DARE: per fed token and layer, reuse of K/V and attention output.

A cache policy decides which tokens a forward feeds; DARE decides, for each fed
token in each layer, whether its K/V projection and its attention row are
recomputed or reused from the previous forward (the query delta since the cached
step against a threshold, decided inside the DARE attention kernels,
``attention_backends/``). This module holds everything per request that drives
those kernels:

* the settings (``DareSettings``): engine defaults (``--additional-config
  '{"dare": {...}}'``) and per-request overrides (``SamplingParams.extra_args``:
  ``dare_mode``, ``dare_tau_kv``, ``dare_tau_o``, ``dare_refresh_interval``,
  ``dare_recompute_candidates``, ``dare_candidate_limit``), checked at admission
  (``request_settings``);
* the forced-row rules (``DareRequests.step_inputs``): the rows a forward must
  recompute whatever their query delta says;
* the per-request reuse counts (``DareRequests.record_step``, ``figures``); the
  engine-wide Prometheus counters are in ``dare_counters.py``.

Knobs:

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

import numpy as np
import torch

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


def request_settings(extra_args: dict[str, Any] | None,
                     engine_settings: dict[str, Any] | None) -> DareSettings | None:
    """The request's DARE settings (``engine_settings``: the engine's, None when it
    does not run the DARE backend, where ``dare_*`` knobs are an error)."""
    uses_dare_keys = any(k.startswith("dare_") for k in (extra_args or {}))
    if engine_settings is None:
        if uses_dare_keys:
            raise ValueError(
                "dare_* knobs need the DARE attention backend "
                "(--attention-backend dare)"
            )
        return None
    return DareSettings(**engine_settings).for_request(extra_args)


class DareRequests:
    """DARE's per-request state in the worker, by batch slot: settings, the input
    ids of the previous forward, forwards run, reuse counts.

    Forced rows (recomputed whatever their query delta; ``step_inputs``):

    * every row of a request's forwards until it has a full forward over its
      whole sequence to compare with (the prompt pass and the first full
      forward), and every row of a forward whose sequence changed shape;
    * every ``refresh_interval``-th forward, and with ``refresh_at_block_start``
      the first forward of each block (of the denoiser whose step the forward's
      logits decide: a guidance twin follows its owner);
    * tokens whose input id changed since the previous forward (just unmasked);
    * with ``recompute_candidates``, the hidden rows whose logits this step's
      unmasking choice reads (at most ``candidate_limit`` of them, the most
      confident ones first).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.settings: dict[int, DareSettings] = {}
        self.counts: dict[int, np.ndarray] = {}
        self._prev_inputs: dict[int, torch.Tensor] = {}
        self._forwards: dict[int, int] = {}

    def add(self, slot: int, settings: DareSettings | None) -> None:
        if settings is not None:
            self.settings[slot] = settings
            self.counts[slot] = np.zeros(6, dtype=np.int64)

    def remove(self, slot: int) -> None:
        self.settings.pop(slot, None)
        self.counts.pop(slot, None)
        self._prev_inputs.pop(slot, None)
        self._forwards.pop(slot, None)

    def step_inputs(self, input_batch, deciding, logits_position_offset: int):
        """Per-token DARE inputs of this forward over ``input_batch``'s scheduled
        tokens. ``deciding(slot)``: the denoiser whose step the slot's forward
        serves (None for dummy slots)."""
        from vllm_dare.attention_backends.dare_layer_step import DareStepInputs

        num_reqs = input_batch.num_reqs
        T = input_batch.num_tokens
        starts = input_batch.query_start_loc_np[: num_reqs + 1]
        num_logits = np.diff(input_batch.cu_num_logits_np[: num_reqs + 1])
        input_ids = input_batch.input_ids[:T]
        force = torch.ones(T, dtype=torch.bool, device=self.device)
        reusing = torch.zeros(T, dtype=torch.bool, device=self.device)
        tau_kv = torch.zeros(T, dtype=torch.float32, device=self.device)
        tau_o = torch.zeros(T, dtype=torch.float32, device=self.device)
        kv_ref = torch.ones(T, dtype=torch.bool, device=self.device)
        any_reuse = keeps_reference = keeps_o = False
        for i in range(num_reqs):
            slot = int(input_batch.idx_mapping_np[i])
            settings = self.settings.get(slot)
            if settings is None:
                continue
            a, b = int(starts[i]), int(starts[i + 1])
            ids = input_ids[a:b]
            prev = self._prev_inputs.get(slot)
            self._prev_inputs[slot] = ids.clone()
            forwards = self._forwards.get(slot, 0)
            self._forwards[slot] = forwards + 1
            kv_ref[a:b] = settings.reuses_kv
            if not (settings.reuses_kv or settings.reuses_o):
                continue
            keeps_reference = True  # from its first forward on: later steps read it
            keeps_o = keeps_o or settings.reuses_o
            reusing[a:b] = True
            if num_logits[i] == 0 or prev is None or prev.shape != ids.shape:
                continue  # prompt pass or first forward over the full sequence
            if settings.refresh_interval and forwards % settings.refresh_interval == 0:
                continue
            denoiser = deciding(slot)
            if (settings.refresh_at_block_start and denoiser is not None
                    and denoiser.at_block_start()):
                continue
            force[a:b] = ids != prev  # tokens whose input changed
            if settings.recompute_candidates and denoiser is not None:
                # The hidden rows whose logits pick this step's tokens (Dream reads
                # position p's logits from row p - 1).
                candidates = denoiser.candidates(settings.candidate_limit)
                first = a + int(input_batch.prefill_len_np[i]) + logits_position_offset
                force[first + candidates.nonzero().squeeze(-1)] = True
            tau_kv[a:b] = settings.tau_kv if settings.reuses_kv else 0.0
            tau_o[a:b] = settings.tau_o if settings.reuses_o else 0.0
            any_reuse = True
        return DareStepInputs(force, tau_kv, tau_o, kv_ref, any_reuse,
                              keeps_reference=keeps_reference, keeps_o=keeps_o,
                              reusing=reusing)

    def record_step(self, runtime, slots, req_ids, model_name: str, log=None) -> None:
        """Add the forward's reuse counts (``runtime``: the model's ``DareRuntime``
        after the forward) to each request's and to the engine's counters."""
        from vllm_dare.cache_policies import dare_counters

        step_counts = runtime.request_counts.cpu().numpy()
        dare_counters.record_layers(runtime.layer_counts, model_name)
        for i, slot in enumerate(slots):
            counts = self.counts.get(int(slot))
            if counts is None:
                continue
            counts += step_counts[i]
            if log is not None:
                tokens, kv, o = (int(x) for x in step_counts[i][:3])
                log("DARE %s: %d token-layer rows, K/V reused %d, O reused %d "
                    "(settings %s)", req_ids[i], tokens, kv, o, self.settings.get(int(slot)))

    def figures(self, slot: int, num_layers: int) -> dict | None:
        """The request's reuse figures (``kv_transfer_params["dare"]``), or None
        when it does not run DARE."""
        from vllm_dare.cache_policies import dare_counters

        counts = self.counts.get(slot)
        if counts is None:
            return None
        return {**dare_counters.summarize(counts), "num_layers": num_layers}
