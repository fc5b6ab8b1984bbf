"""Per-request figures handed from the worker to the request's output.

The sampler records them when a request emits its canvas; the scheduler attaches
them to the finished request's output as ``RequestOutput.kv_transfer_params`` --
the one free-form per-request field vLLM carries from the engine to the client
(and that its OpenAI server returns in the response):

* ``"dllm"``: ``forwards`` (model forwards that processed the request, the prompt
  pass included: the NFE), ``denoising_steps`` (steps run), ``gen_length``;
* ``"dare"`` (DARE backend only): reuse counts, see ``dare_stats.summarize``.

The same channel carries the requests the worker had to fail
(``report_failure`` / ``take_failures``): a request whose state the worker
cannot explain is ended by the scheduler with ``finish_reason="error"``, and
the engine goes on serving the others.

Worker and scheduler share this module's dictionary when they share a process
(vLLM's single-process executor: one GPU, or ``LLM`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). With vLLM's multiprocess executor (tensor
parallelism, and every ``vllm serve`` on the CPU build, whose platform forces it)
the workers are child processes of the engine-core process, and the figures go
through files in the temporary directory whose names start with that process's
id (``channel``): the first tensor-parallel rank writes one small JSON file
per request and section (written to a temporary name, then renamed), and the
scheduler reads and deletes it when the request's output leaves the engine. The Ray executor is not covered: its workers are not children of the
engine core, so the figures are not attached there.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import threading

_lock = threading.Lock()
_pending: dict[str, dict] = {}
_MAX_PENDING = 100_000  # bound for figures nobody collects
_failures: dict[str, str] = {}
SECTIONS = ("dllm", "dare")


def channel(engine_pid: int) -> str:
    """Path prefix of the figures that the workers of engine-core process
    ``engine_pid`` leave in the temporary directory (files, no directory of our
    own: an engine that is killed leaves nothing behind but uncollected figures)."""
    return os.path.join(tempfile.gettempdir(), f"vllm-dare-request-stats-{engine_pid}-")


def clear_channel(prefix: str) -> None:
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


def put(req_id: str, section: str, stats: dict, prefix: str | None = None) -> None:
    """Record a request's figures: in this process, or in the channel ``prefix``
    for a scheduler in another process."""
    if prefix is not None:
        path = _file(prefix, req_id, section)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)
        return
    with _lock:
        _pending.setdefault(req_id, {})[section] = stats
        if len(_pending) > _MAX_PENDING:
            _pending.pop(next(iter(_pending)))


def take(req_id: str, prefix: str | None = None) -> dict | None:
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
    with _lock:
        return _pending.pop(req_id, None)


def _failures_file(prefix: str) -> str:
    return f"{prefix}failures.json"


def report_failure(req_id: str, reason: str, prefix: str | None = None) -> None:
    """Record that the worker failed request ``req_id`` (why, in words). The
    scheduler reads the step's failures after the step (``take_failures``);
    steps are synchronous, so the worker never writes while it reads."""
    if prefix is None:
        with _lock:
            _failures[req_id] = reason
        return
    path = _failures_file(prefix)
    try:
        with open(path) as f:
            failures = json.load(f)
    except FileNotFoundError:
        failures = {}
    failures[req_id] = reason
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(failures, f)
    os.replace(tmp, path)


def take_failures(prefix: str | None = None) -> dict[str, str]:
    """The requests failed by the worker since the last call: id -> reason."""
    if prefix is None:
        with _lock:
            failures = dict(_failures)
            _failures.clear()
        return failures
    path = _failures_file(prefix)
    try:
        with open(path) as f:
            failures = json.load(f)
    except FileNotFoundError:
        return {}
    os.unlink(path)
    return failures
