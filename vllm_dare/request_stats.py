"""Per-request figures handed from the worker to the request's output.

The sampler records them when a request emits its canvas; the scheduler attaches
them to the finished request's output as ``RequestOutput.kv_transfer_params`` --
the one free-form per-request field vLLM carries from the engine to the client
(and that its OpenAI server returns in the response):

* ``"dllm"``: ``forwards`` (model forwards that processed the request, the prompt
  pass included: the NFE), ``denoising_steps`` (steps run), ``gen_length``;
* ``"dare"`` (DARE backend only): reuse counts, see ``cache_policies/dare_counters.summarize``.

The same channel carries two per-step reports (``report`` / ``take_reports``):
the requests the worker had to fail (``report_failure``): a request whose
state the worker cannot explain is ended by the scheduler with
``finish_reason="error"``, and the engine goes on serving the others; and the
committed canvas prefix of streaming requests (``report_committed``), which the
scheduler sends to their clients while they are still denoising.

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
_reports: dict[str, dict] = {}  # kind -> request id -> report
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


def _reports_file(prefix: str, kind: str) -> str:
    return f"{prefix}{kind}.json"


def report(kind: str, updates: dict[str, object], prefix: str | None = None) -> None:
    """Record per-request reports of one step (``kind``: ``"failures"``,
    ``"committed"``), merged with those not yet taken. The scheduler reads them
    after the step (``take_reports``); steps are synchronous, so the worker never
    writes while it reads."""
    if not updates:
        return
    if prefix is None:
        with _lock:
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


def take_reports(kind: str, prefix: str | None = None) -> dict:
    """The reports of ``kind`` since the last call: request id -> report."""
    if prefix is None:
        with _lock:
            return _reports.pop(kind, {})
    path = _reports_file(prefix, kind)
    try:
        with open(path) as f:
            reports = json.load(f)
    except FileNotFoundError:
        return {}
    os.unlink(path)
    return reports


def report_failure(req_id: str, reason: str, prefix: str | None = None) -> None:
    """Record that the worker failed request ``req_id`` (why, in words)."""
    report("failures", {req_id: reason}, prefix)


def take_failures(prefix: str | None = None) -> dict[str, str]:
    """The requests failed by the worker since the last call: id -> reason."""
    return take_reports("failures", prefix)


def report_committed(prefixes: dict[str, list[int]], prefix: str | None = None) -> None:
    """Record the committed canvas prefix of streaming requests whose prefix
    grew in this step (``core/committed_stream.py``)."""
    report("committed", prefixes, prefix)


def take_committed(prefix: str | None = None) -> dict[str, list[int]]:
    """The committed prefixes reported since the last call: id -> tokens."""
    return take_reports("committed", prefix)
