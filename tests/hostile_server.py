"""A key service that speaks the contract's shape but lies: one real HTTP server, one lie per case.

`RawServer` answers every request with whatever a handler returns (any status, headers, bytes,
trickled or not). `LyingKeyService` is a small, honest implementation of docs/keyservice-api.md (clients,
paged keys, reset with Idempotency-Key and stored responses, the token check) whose answers a test
bends with `lie` (see `LIES`).
"""

from __future__ import annotations

import base64
import gzip
import json
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "hostile-management-token"


@dataclass
class Request:
    method: str
    path: str  # raw, as sent (percent-encoding kept)
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunk_delay_s: float = 0.0  # between chunks of an iterable body (a trickle)
    length: int | None = None  # Content-Length to announce (default: the body's, when it is bytes)


def json_reply(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})


def trickle(data: bytes, every_s: float) -> Reply:
    """`data` one byte at a time, `every_s` apart, with its full Content-Length announced."""
    return Reply(200, (data[i:i + 1] for i in range(len(data))), {"Content-Type": "application/json"},
                 chunk_delay_s=every_s, length=len(data))


def gzip_bomb(expanded_bytes: int) -> bytes:
    """A valid gzip stream of `expanded_bytes` zeros (a multiple of 1 MiB), about 1/1000 of that on
    the wire. Each MiB is one fully flushed, byte-aligned deflate block, so the block is built once
    and repeated."""
    block = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    middle = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    ending = packer.flush(zlib.Z_FINISH)[:-8]
    count = expanded_bytes >> 20
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    return first + middle * (count - 1) + ending + struct.pack("<II", crc, (count << 20) & 0xFFFFFFFF)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a lie is the point of most tests


class RawServer:
    """A threaded HTTP server on 127.0.0.1 that hands every request to `handler`."""

    def __init__(self, handler: Callable[[Request], Reply]) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                parts = urlsplit(self.path)
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                request = Request(self.command, parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()},
                                  {k: v for k, v in self.headers.items()}, body)
                outer.requests.append(request)
                reply = outer.handler(request)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if isinstance(reply.body, bytes):
                        self.send_header("Content-Length", str(len(reply.body) if reply.length is None
                                                               else reply.length))
                        self.end_headers()
                        self.wfile.write(reply.body)
                        return
                    if reply.length is not None:
                        self.send_header("Content-Length", str(reply.length))
                    else:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.flush()
                    for chunk in reply.body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        if reply.chunk_delay_s:
                            time.sleep(reply.chunk_delay_s)
                    if reply.length is None:
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = do_PUT = _any

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- a contract-shaped key service with lies -------------------------------------------------------

DAY = 86_400

#: What `LyingKeyService.lie` can be, and what each does.
LIES = {
    "": "tells the truth",
    "listing_traversal_id": "the listing names a key '../../outside'",
    "listing_absolute_id": "the listing names a key '/tmp/rotator-abs'",
    "reset_names_other_key": "a reset answer names the client's other key",
    "reset_traversal_id": "a reset answer names the key '../../outside'",
    "pages_forever": "X-Number-Of-Pages: 1000000000 and the same rows on every page",
    "pages_superscript": "X-Number-Of-Pages: ²",
    "trickle_listing": "the listing's body comes one byte a second (each read within any per-read time-out)",
    "trickle_reset": "the reset's body comes one byte a second",
    "huge_listing": "the listing is 50 MB",
    "gzip_bomb_listing": "the listing is 1 MB of gzip expanding to 1 GiB",
    "reset_cut": "the 200 reset answer is cut in half",
    "reset_not_json": "the 200 reset answer is not JSON",
    "reset_no_secret": "the 200 reset answer has no Secret",
    "reset_surrogate_secret": "the reset's Secret holds a lone surrogate",
    "reset_secret_in_environment": "the reset answer puts the secret in Environment",
    "reset_secret_in_alias": "the reset answer puts the secret in Alias",
    "replay_secret_in_alias": "the reset answer is cut; the stored answer puts the secret in Alias",
    "replay_unavailable": "the reset answer is cut; the stored answer's endpoint answers 503 naming its URL",
    "gateway_echoes_key": "a gateway answers the reset 502, its Message quoting the Idempotency-Key header",
    "double_gzip_listing": "the listing comes gzip inside gzip (Content-Encoding: gzip, gzip)",
    "pages_alternating": "pages alternate between the two keys, X-Number-Of-Pages: 1000",
    "get_keeps_old_dates": "a reset answers with the new LastResetDate, but gets and listings keep the old one",
    "dates_in_ms": "LastResetDate in milliseconds",
    "dates_huge": "LastResetDate is 10^20",
    "alias_markup": "aliases with rich markup: '[/bold]', '[link=…]'",
    "alias_escapes": "an alias with terminal escapes (clear screen, title, bell)",
    "long_key_id": "a key id of 10,000 characters",
    "error_echo": "every 4xx error Message is 1 MB with escapes",
}


@dataclass
class Key:
    id: str
    alias: str
    created: int
    last_reset: int | None
    secret: str
    first_reset: int | None = None  # the LastResetDate before rotator's first reset (get_keeps_old_dates)


class LyingKeyService:
    """Client `acme` (PRODUCTION) with a due key `key_due` and a young key `key_young`."""

    def __init__(self, lie: str = "") -> None:
        assert lie in LIES, lie
        self.lie = lie
        now = int(time.time())
        self.keys = {
            "key_due": Key("key_due", "Auto-generated key", now - 400 * DAY, now - 120 * DAY, self._new_secret()),
            "key_young": Key("key_young", "payments", now - 5 * DAY, None, self._new_secret()),
        }
        if lie == "alias_markup":
            self.keys["key_due"].alias = "[/bold]"
            self.keys["key_young"].alias = "[link=https://evil.example/]click me[/link]"
        self.resets: list[str] = []  # key ids, one per reset that ran
        self.stored: dict[str, tuple[str, int, bytes]] = {}  # idempotency key -> (path, status, body)
        self.issued: list[str] = []  # every secret this service handed out
        self.idempotency_keys: list[str] = []  # every key a write or a replay came with: each reads a secret
        self._lock = threading.Lock()

    def _new_secret(self) -> str:
        return "prod_" + secrets.token_urlsafe(32)

    # --- the contract, bent by `lie` -----------------------------------------------------------
    def key_object(self, key: Key, *, answer: bool = False) -> dict[str, Any]:
        obj: dict[str, Any] = {"Id": key.id, "ClientId": "acme", "Alias": key.alias,
                               "IsAutoGenerated": key.id == "key_due", "Environment": "PRODUCTION",
                               "Scopes": [{"Scope": "Payins", "Read": True, "Write": True}],
                               "CreationDate": key.created, "LastResetDate": key.last_reset, "Status": "ACTIVE"}
        if self.lie == "dates_in_ms" and key.last_reset is not None:
            obj["LastResetDate"] = key.last_reset * 1000
        if self.lie == "dates_huge":
            obj["LastResetDate"] = 10**20
        if self.lie == "alias_escapes" and key.id == "key_due":
            obj["Alias"] = "ok\x1b]0;pwned title\x07\x1b[2J\x1b[31mred\x07"
        if self.lie == "get_keeps_old_dates" and not answer:
            obj["LastResetDate"] = key.first_reset if key.first_reset is not None else key.last_reset
        return obj

    def listing(self) -> list[dict[str, Any]]:
        rows = [self.key_object(k) for k in self.keys.values()]
        if self.lie == "listing_traversal_id":
            rows.append({**rows[0], "Id": "../../outside"})
        if self.lie == "listing_absolute_id":
            rows.append({**rows[0], "Id": "/tmp/rotator-abs"})
        if self.lie == "long_key_id":
            rows.append({**rows[0], "Id": "k" * 10_000})
        return rows

    def handle(self, request: Request) -> Reply:
        with self._lock:
            return self._handle(request)

    def _handle(self, request: Request) -> Reply:
        path = request.path
        if path == "/v2.01/oauth/token":
            return self._token(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "unauthorized", "bad token")
        if path == "/v2.01/clients" and request.method == "GET":
            page = int(request.query.get("page", "1"))
            rows = [{"ClientId": "acme", "Name": "Acme", "Environment": "PRODUCTION"}] if page == 1 else []
            return json_reply(rows, headers={"X-Number-Of-Pages": "1", "X-Number-Of-Items": "1"})
        if path == "/v2.01/acme/apikeys" and request.method == "GET":
            return self._listing(int(request.query.get("page", "1")))
        prefix = "/v2.01/acme/apikeys/"
        if path.startswith(prefix) and request.method == "GET":
            key = self.keys.get(path.removeprefix(prefix))
            if key is None:
                return self._error(404, "ressource_not_found", "key not found")
            return json_reply(self.key_object(key))
        if path.startswith(prefix) and path.endswith("/reset") and request.method == "POST":
            return self._reset(path, path.removeprefix(prefix).removesuffix("/reset"),
                               request.headers.get("Idempotency-Key", ""))
        if path.startswith("/v2.01/acme/responses/") and request.method == "GET":
            self.idempotency_keys.append(path.rsplit("/", 1)[1])
            if self.lie == "replay_unavailable":  # a gateway's page, naming what was asked
                return self._error(503, "internal_error", f"upstream unavailable for {path}")
            stored = self.stored.get(path.rsplit("/", 1)[1])
            if stored is None:
                return self._error(404, "ressource_not_found", "nothing stored")
            stored_path, status, body = stored
            return json_reply({"StatusCode": status, "ContentLength": len(body), "ContentType": "application/json",
                               "Date": int(time.time()), "RequestURL": stored_path,
                               "Resource": json.loads(body)})
        return self._error(404, "ressource_not_found", "no such endpoint")

    def _listing(self, page: int) -> Reply:
        rows = self.listing()
        headers = {"X-Number-Of-Pages": "1", "X-Number-Of-Items": str(len(rows))}
        if self.lie == "pages_forever":
            return json_reply(rows, headers={"X-Number-Of-Pages": "1000000000"})
        if self.lie == "pages_superscript":
            return json_reply(rows if page == 1 else [], headers={"X-Number-Of-Pages": "²"})
        if self.lie == "pages_alternating":
            return json_reply([rows[page % 2]], headers={"X-Number-Of-Pages": "1000"})
        if page > 1:
            return json_reply([], headers=headers)
        body = json.dumps(rows).encode()
        if self.lie == "trickle_listing":
            return trickle(body, 1.0)
        if self.lie == "huge_listing":
            return Reply(200, body[:-1] + b"," + b" " * (50 << 20) + b"]", {"Content-Type": "application/json"})
        if self.lie == "gzip_bomb_listing":
            return Reply(200, _bomb(), {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        if self.lie == "double_gzip_listing":
            return Reply(200, gzip.compress(_bomb()), {"Content-Type": "application/json",
                                                       "Content-Encoding": "gzip, gzip"})
        return json_reply(rows, headers=headers)

    def _reset(self, path: str, key_id: str, idempotency_key: str) -> Reply:
        self.idempotency_keys.append(idempotency_key)
        if self.lie == "gateway_echoes_key":
            return self._error(502, "bad_gateway", f"upstream timed out; retry with Idempotency-Key: "
                                                   f"{idempotency_key.upper()}")
        if idempotency_key in self.stored:
            stored_path, status, body = self.stored[idempotency_key]
            if stored_path != path:
                return self._error(409, "conflict", "Idempotency-Key already used for another request")
            return Reply(status, body, {"Content-Type": "application/json"})
        key = self.keys.get(key_id)
        if key is None:
            return self._error(404, "ressource_not_found", "key not found")
        key.secret = self._new_secret()
        if key.first_reset is None:
            key.first_reset = key.last_reset
        key.last_reset = max(int(time.time()), (key.last_reset or 0) + 1)
        self.resets.append(key_id)
        self.issued.append(key.secret)
        answer = {**self.key_object(key, answer=True), "Secret": key.secret}
        if self.lie == "reset_names_other_key":
            other = next(k for k in self.keys.values() if k.id != key_id)
            answer = {**self.key_object(other), "LastResetDate": key.last_reset, "Secret": key.secret}
        if self.lie == "reset_traversal_id":
            answer["Id"] = "../../outside"
        if self.lie == "reset_no_secret":
            del answer["Secret"]
        if self.lie == "reset_surrogate_secret":
            answer["Secret"] = key.secret + "\ud800"
        if self.lie == "reset_secret_in_environment":
            answer["Environment"] = key.secret
        if self.lie in ("reset_secret_in_alias", "replay_secret_in_alias"):
            answer["Alias"] = key.secret
        body = json.dumps(answer).encode()
        self.stored[idempotency_key] = (path, 200, body)  # what a replay returns: the whole answer
        if self.lie == "replay_secret_in_alias":
            return Reply(200, body[: len(body) // 2], {"Content-Type": "application/json"})
        if self.lie in ("reset_cut", "replay_unavailable"):
            return Reply(200, body[: len(body) // 2], {"Content-Type": "application/json"})
        if self.lie == "reset_not_json":
            return Reply(200, b"<html>upstream says hi</html>", {"Content-Type": "text/html"})
        if self.lie == "trickle_reset":
            return trickle(body, 1.0)
        return Reply(200, body, {"Content-Type": "application/json"})

    def _token(self, request: Request) -> Reply:
        auth = request.headers.get("Authorization", "")
        try:
            client, _, secret = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            return self._error(401, "unauthorized", "bad credentials")
        if client == "acme" and any(k.secret == secret for k in self.keys.values()):
            return json_reply({"access_token": "t", "token_type": "bearer", "expires_in": 3600})
        return self._error(401, "unauthorized", "bad credentials")

    def _error(self, status: int, kind: str, message: str) -> Reply:
        if self.lie == "error_echo":
            message = "\x1b[2J\x07" + "A" * (1 << 20)
        return json_reply({"Id": "e", "Type": kind, "Message": message, "Date": int(time.time())}, status)


_BOMB: list[bytes] = []


def _bomb() -> bytes:
    if not _BOMB:
        _BOMB.append(gzip_bomb(1 << 30))
    return _BOMB[0]
