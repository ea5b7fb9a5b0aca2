"""Start and stop local HTTP servers as subprocesses, for benchmarks and tests.

A server runs in a session of its own with its output in a log file; :func:`running_server`
waits until a readiness URL answers 200 and always stops the whole process tree afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import psutil

READY_TIMEOUT_S = 120.0


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    command: Sequence[str],
    *,
    ready_url: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[subprocess.Popen]:
    """Run ``command`` until the block ends; enter once ``ready_url`` answers 200."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(ready_url, process, log_path, ready_timeout_s)
            yield process
        finally:
            stop(process)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise ServerFailed(f"server not ready after {timeout_s:.0f}s:\n{log.read_text()[-5000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server, which stops its workers; if it hangs, SIGKILL them all."""
    if process.poll() is not None:
        return
    # Workers may run in process groups of their own: note them now, by pid.
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        for child in [*workers, process]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                child.kill()
        process.wait(timeout=10)
