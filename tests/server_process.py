"""Start and stop ``vllm-dare serve`` for the server tests (loopback only)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_dare_command() -> str:
    """The ``vllm-dare`` console script of this environment."""
    path = os.path.join(os.path.dirname(sys.executable), "vllm-dare")
    return path if os.path.exists(path) else shutil.which("vllm-dare")


class Server:
    """``vllm-dare serve MODEL ARGS`` on 127.0.0.1, its output in ``log``."""

    def __init__(self, model: str, args: list[str], log_path, env_updates=None,
                 start_timeout: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # served as users serve it
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(env_updates or {})
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.cmd = [vllm_dare_command(), "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        start = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log()[-5000:])
            try:
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - start > start_timeout:
                self.stop()
                raise RuntimeError("server did not start in time:\n" + self.log()[-5000:])
            time.sleep(1)
        self.start_seconds = time.time() - start

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self, timeout: float = 60) -> int:
        """SIGINT (the server's graceful shutdown); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
