"""A local HTTP endpoint that records what it receives and can fail or hang on purpose."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []
        self.answers: list[int] = []  # statuses to give first, then 200
        self.attempts: list[Received] = []  # every request, whatever it was answered
        self.hang_s = 0.0
        self.get_body = b'{"kind": "Deployment", "spec": {"paused": false}}'
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def events(self) -> list[str]:
        with self.lock:
            return [r.headers.get("X-Rotator-Event", "") for r in self.received]

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"received {len(self.received)} of {count}")

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hang_s = 0
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.hang_s:
            time.sleep(self.server.hang_s)
        with self.server.lock:
            self.server.attempts.append(Received(self.path, dict(self.headers.items()), body))
            status = self.server.answers.pop(0) if self.server.answers else 200
            if status == 200:
                self.server.received.append(Received(self.path, dict(self.headers.items()), body))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PATCH = do_POST  # the Kubernetes API's verb of a rollout restart

    def do_GET(self) -> None:
        """The object asked for (`get_body`): the Kubernetes API's Deployment read before a restart."""
        with self.server.lock:
            self.server.attempts.append(Received(self.path, dict(self.headers.items()), b""))
            status = self.server.answers.pop(0) if self.server.answers else 200
        body = self.server.get_body if status == 200 else b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
