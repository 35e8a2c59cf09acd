"""moto's server over real HTTP, and a fault-injecting proxy in front of it."""

from __future__ import annotations

import collections
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


class FaultProxy(ThreadingHTTPServer):
    """Forwards to `target`; answers the next `fail_times` calls of `operation` with an AWS error."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target = target
        self.faults: list[dict[str, Any]] = []
        self.http = httpx.Client(base_url=target, timeout=10)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    def fail(self, operation: str, code: str, status: int = 400, times: int = 1) -> None:
        self.faults.append({"operation": operation, "code": code, "status": status, "times": times})

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.http.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
        for fault in self.server.faults:
            if fault["operation"] in (operation, "*") and fault["times"] != 0:
                fault["times"] -= 1
                payload = json.dumps({"__type": fault["code"], "message": "injected"}).encode()
                self.send_response(fault["status"])
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-ErrorType", fault["code"])
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        self.forward(body, keep_host=False)

    def forward(self, body: bytes, keep_host: bool) -> None:
        """Send the call on to the target and its answer back (the Host header only where a
        signature covers it)."""
        dropped = ("content-length",) if keep_host else ("host", "content-length")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
        answer = self.server.http.post(self.path, content=body, headers=headers)
        self.send_response(answer.status_code)
        for k, v in answer.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)


class MotoProcess:
    """moto's server in its own process with authentication on after `no_auth` actions.

    Its own process because moto's auth switch (`moto.settings.INITIAL_NO_AUTH_ACTION_COUNT`, read
    from the environment at import), its action counter and its backends are globals of the
    process: a `ThreadedMotoServer` shares them with every other moto server of the test run."""

    def __init__(self, no_auth: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(no_auth)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> MotoProcess:
        deadline = time.monotonic() + 15
        while True:  # a TCP connect is no AWS action: it does not spend the unauthenticated ones
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


STS_ERRORS = {
    "InvalidClientTokenId": "The security token included in the request is invalid.",
    "SignatureDoesNotMatch": "The request signature we calculated does not match the signature you provided.",
}


class QueryFaultProxy(FaultProxy):
    """FaultProxy for AWS's query protocol (IAM, STS): the operation is the form's `Action`, an
    error is AWS's XML, status 0 drops the connection unanswered, and the Host header is kept (a
    SigV4 signature covers it, and this proxy is meant for a moto that checks signatures).
    `seen` counts the calls of each operation that reached the proxy."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.RequestHandlerClass = _QueryProxyHandler
        self.seen: collections.Counter[str] = collections.Counter()


class _QueryProxyHandler(_ProxyHandler):
    server: QueryFaultProxy

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        operation = urllib.parse.parse_qs(body.decode()).get("Action", [""])[0]
        self.server.seen[operation] += 1
        for fault in self.server.faults:
            if fault["operation"] in (operation, "*") and fault["times"] != 0:
                fault["times"] -= 1
                if fault["status"] == 0:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                message = STS_ERRORS.get(fault["code"], "injected")
                payload = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                           f'<Type>Sender</Type><Code>{fault["code"]}</Code><Message>{message}</Message></Error>'
                           f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>").encode()
                self.send_response(fault["status"])
                self.send_header("Content-Type", "text/xml")
                self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        self.forward(body, keep_host=True)


class CuttingQueryProxy(QueryFaultProxy):
    """QueryFaultProxy that can also lose an answer: `cut(operation)` forwards the next call to
    moto, so it runs there, then drops the connection before the answer reaches the caller (a
    CreateAccessKey whose key exists and whose secret nobody received)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.RequestHandlerClass = _CuttingQueryProxyHandler
        self.cuts: list[dict[str, Any]] = []
        self.lost: list[tuple[str, bytes]] = []  # (operation, the answer moto gave): it may hold a secret

    def cut(self, operation: str, times: int = 1) -> None:
        self.cuts.append({"operation": operation, "times": times})


class _CuttingQueryProxyHandler(_QueryProxyHandler):
    server: CuttingQueryProxy

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        operation = urllib.parse.parse_qs(body.decode()).get("Action", [""])[0]
        for cut in self.server.cuts:
            if cut["operation"] in (operation, "*") and cut["times"] != 0:
                cut["times"] -= 1
                self.server.seen[operation] += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
                answer = self.server.http.post(self.path, content=body, headers=headers)  # it runs at moto
                self.server.lost.append((operation, answer.content))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        self.rfile = io.BytesIO(body)  # the faults and the forwarding read the body again
        super().do_POST()
