"""No client of a sink or of the key service follows a redirect to another origin with its
credentials: a real server answers 307 towards a second real server, which must hear nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rotator.domain import ApiKey, Environment, Secret
from rotator.errors import RotatorError
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.http import HttpKeyService
from rotator.protocols import SecretRecord
from rotator.sinks import registry

SECRET = "live-secret-value-never-resent-0123456789"
TOKEN = "vault-token-never-resent-0123456789"


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, redirect_to: str | None = None) -> None:
        self.redirect_to = redirect_to
        self.heard: list[tuple[str, str, dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.heard.append((self.command, self.path, dict(self.headers), body))
        if self.server.redirect_to is not None:
            self.send_response(307)
            self.send_header("Location", self.server.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[tuple[_Recorder, _Recorder]]:
    """`there`, another origin, and `here`, which redirects every request to it."""
    there = _Recorder()
    here = _Recorder(redirect_to=there.url)
    yield here, there
    here.shutdown()
    there.shutdown()


def test_the_vault_sink_sends_neither_token_nor_secret_to_another_origin(
    elsewhere: tuple[_Recorder, _Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there = elsewhere
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    sink: Any = registry.build("vault", {"url": here.url}, Fingerprinter("k" * 32))
    key = ApiKey("acme", "key_1", "payouts", Environment.PRODUCTION, (), 1_700_000_000, 1_700_000_000)
    secret = Secret(SECRET)
    record = SecretRecord(key, secret, "attempt-1", Fingerprinter("k" * 32)(secret), 1_700_000_100.0)
    with pytest.raises(RotatorError, match=r"307 redirecting to another origin \(http://127\.0\.0\.1:\d+\)"):
        sink.write(record)
    with pytest.raises(RotatorError, match="another origin"):
        sink.ping()
    assert here.heard and there.heard == []  # the write reached Vault's address, and nothing went on
    assert any(h[2].get("X-Vault-Token") == TOKEN for h in here.heard)


def test_the_key_service_client_follows_no_redirect(elsewhere: tuple[_Recorder, _Recorder]) -> None:
    here, there = elsewhere
    with HttpKeyService(here.url, TOKEN, timeout_s=2, max_attempts=1) as service, pytest.raises(RotatorError):
        service.reset_key("acme", "key_1", "idem-key-never-resent")
    assert here.heard and there.heard == []
