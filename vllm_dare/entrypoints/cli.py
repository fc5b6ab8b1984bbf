"""``vllm-dare serve``: vLLM's ``vllm serve`` set up for diffusion models.

    vllm-dare serve MODEL [any `vllm serve` option ...]

It runs vLLM's own ``serve`` subcommand (same options, same server) and adds
what a diffusion server needs and plain ``vllm serve`` cannot give it:

* the OpenAI-compatibility middleware
  (``vllm_dare.entrypoints.sampling_middleware.DiffusionSamplingMiddleware``:
  OpenAI ``temperature`` / ``seed`` as denoising knobs, and the served canvas as
  the default ``max_tokens`` of ``/v1/completions``), unless ``--middleware``
  already names it;
* Prometheus multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a new temporary
  directory removed at exit, unless one is set), so the counters the engine
  process records (DARE's reuse counters) reach ``/metrics``;
* a graceful shutdown: ``--shutdown-timeout 15`` unless set (in-flight requests
  get up to 15 s, then are aborted; vLLM's default 0 kills the engine processes
  at once);
* on vLLM's CPU build, a KV-cache size (``VLLM_CPU_KVCACHE_SPACE``, GiB) when none
  is set: without one vLLM's start-up memory check fails on small machines.

* a quiet exit: no report of vLLM's spurious shutdown error or of Triton's
  bindings at interpreter exit.

It exists because the ``vllm`` launcher of the CPU build (distribution
``vllm-cpu``) fails before parsing its arguments: it looks up the version of a
distribution named ``vllm``. ``vllm-dare serve`` works the same on both builds.
Each of these works around a vLLM limit described in ``vllm_dare/vllm_compat.py``.
"""

from __future__ import annotations

import os
import sys

from vllm_dare.vllm_compat import (
    exit_after_shutdown,
    install_shutdown_filter,
    use_prometheus_multiprocess_dir,
)

MIDDLEWARE = "vllm_dare.entrypoints.sampling_middleware.DiffusionSamplingMiddleware"
CPU_KV_CACHE_GIB = "4"
# vLLM's default (0) kills the engine processes at once on SIGINT/SIGTERM, which
# leaves their shared memory and semaphores for Python's resource tracker to
# report; 15 s let them finish a step and exit on their own (their teardown takes
# 3-5 s on 2 cores).
SHUTDOWN_TIMEOUT_S = "15"


def with_shutdown_timeout(argv: list[str]) -> list[str]:
    """``argv`` with ``--shutdown-timeout SHUTDOWN_TIMEOUT_S`` unless it is set."""
    if any(a == "--shutdown-timeout" or a.startswith("--shutdown-timeout=") for a in argv):
        return list(argv)
    return [*argv, "--shutdown-timeout", SHUTDOWN_TIMEOUT_S]


def with_middleware(argv: list[str]) -> list[str]:
    """``argv`` with ``--middleware MIDDLEWARE`` added unless it is there."""
    for i, arg in enumerate(argv):
        if arg == "--middleware" and MIDDLEWARE in argv[i + 1:i + 2]:
            return list(argv)
        if arg == f"--middleware={MIDDLEWARE}":
            return list(argv)
    return [*argv, "--middleware", MIDDLEWARE]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if argv[0] != "serve":
        sys.exit(f"vllm-dare: unknown command {argv[0]!r}; the command is "
                 "'vllm-dare serve MODEL [vllm serve options]'")

    from vllm_dare.cpu_triton import is_cpu_build

    if is_cpu_build():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    use_prometheus_multiprocess_dir()  # before prometheus_client is imported

    from vllm.entrypoints.cli import serve
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm-dare",
                                    description="vLLM's serve for diffusion models")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    commands = {}
    for command in serve.cmd_init():
        command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
        commands[command.name] = command
    args = parser.parse_args([argv[0], *with_shutdown_timeout(with_middleware(argv[1:]))])
    command = commands[args.subparser]
    configure_logging_from_args(args)
    install_shutdown_filter()
    command.validate(args)
    try:
        args.dispatch_function(args)
    except SystemExit as e:  # vLLM's signal handlers end the server this way
        exit_after_shutdown(e.code)
    exit_after_shutdown(0)


if __name__ == "__main__":
    main()
