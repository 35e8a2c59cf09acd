"""No client of a sink or of the key service follows a redirect to another origin with its
credentials: a real server answers 307 towards a second real server, which must hear nothing."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rotator.domain import ApiKey, Environment, Secret
from rotator.errors import ForbiddenError, RotatorError, TransientError
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


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (a private CA of one), and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "vault.pem", tmp / "vault.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_vault_sink_still_trusts_its_ca_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session that refuses redirects keeps `ca_bundle`: a Vault with a private CA is reached (its
    answer here is a capability refusal), and without the bundle the certificate is refused."""
    cert, key = _self_signed(tmp_path)
    server = _Recorder()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        trusting: Any = registry.build("vault", {"url": url, "ca_bundle": str(cert)}, Fingerprinter("k" * 32))
        with pytest.raises(ForbiddenError):
            trusting.ping()
        strict: Any = registry.build("vault", {"url": url}, Fingerprinter("k" * 32))
        with pytest.raises(TransientError, match="SSLError"):
            strict.ping()
    finally:
        server.shutdown()
