"""Serves an `Emulator` over real HTTP, with fault injection and a control surface.

Routes follow docs/keyservice-api.md (and docs/keyservice-openapi.yaml), in the payment API's
published wire format unless the emulator's `wire` is "legacy". The control surface, under
`/_emulator/`, is not part of that contract; it needs the same management token: `GET ledger`,
`POST faults` / `DELETE faults`, `POST clock` (`{"offset_s"}`), `POST latency` (`{"latency_s"}`),
`POST seed` (the seed document).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from rotator.config import KeyServiceConfig
    from rotator.keyservice.http import HttpKeyService

from rotator.keyservice.emulator import (
    IDEMPOTENCY_KEY_RE,
    RATE_WINDOWS_S,
    ApiError,
    Emulator,
    Fault,
    StoredResponse,
)

PREFIX = "/v2.01"
_ERROR_TYPES = {400: "param_error", 401: "unauthorized", 403: "forbidden_ressource",
                404: "ressource_not_found", 409: "conflict", 429: "rate_limit"}
_SLASHES = re.compile(r"/{2,}")
#: A call of one Client ID (its path names it): counted against that client's rate limits.
_RATED = re.compile(r"^/v2\.01/(?!oauth/|clients$)([^/]+)/")
KEY_USED = "idempotent_creation_conflict"  # the published 409 of a POST whose Idempotency-Key was used
NOTHING_STORED = "correlationid_not_found"  # the published 400 of the responses endpoint

Route = tuple[str, re.Pattern[str], str]
_ROUTES: list[Route] = [
    ("GET", re.compile(r"^/v2\.01/clients$"), "clients"),
    ("GET", re.compile(r"^/v2\.01/(?P<c>[^/]+)/apikeys$"), "list_keys"),
    ("POST", re.compile(r"^/v2\.01/(?P<c>[^/]+)/apikeys$"), "create"),
    ("GET", re.compile(r"^/v2\.01/(?P<c>[^/]+)/apikeys/(?P<k>[^/]+)$"), "get"),
    ("DELETE", re.compile(r"^/v2\.01/(?P<c>[^/]+)/apikeys/(?P<k>[^/]+)$"), "revoke"),
    ("POST", re.compile(r"^/v2\.01/(?P<c>[^/]+)/apikeys/(?P<k>[^/]+)/reset$"), "reset"),
    ("GET", re.compile(r"^/v2\.01/(?P<c>[^/]+)/apikeys/(?P<k>[^/]+)/secret$"), "secret"),
    ("GET", re.compile(r"^/v2\.01/(?P<c>[^/]+)/responses/(?P<i>[^/]+)$"), "responses"),
    ("POST", re.compile(r"^/v2\.01/oauth/token$"), "token"),
]


class _Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Answer:
    return _Answer(status, json.dumps(payload, separators=(",", ":")).encode(), headers)


def _error(emulator: Emulator, err: ApiError, headers: dict[str, str] | None = None) -> _Answer:
    body: dict[str, Any] = {"Id": str(uuid.uuid4()), "Type": err.kind, "Message": err.message,
                            "Date": emulator.now()}
    if err.errors or emulator.wire == "published":  # published: `"errors": null` when there are none
        body["errors"] = err.errors
    return _json(err.status, body, headers)


class EmulatorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one answer, one segment: no 40 ms delayed-ACK stalls
    server: EmulatorServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read their own output
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        """`Date` on the emulator's own clock, as a service's answers carry its clock (the rate
        limit's reset times are on it too)."""
        return super().date_time_string(self.server.emulator.now() if timestamp is None else timestamp)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # ---------------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        emulator = self.server.emulator
        self._rate_headers: dict[str, str] = {}  # this request's (a kept-alive connection has many)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        path = _SLASHES.sub("/", url.path)  # the real API routes `/responses//{key}` (its SDK asks so)
        if emulator.latency_s:
            time.sleep(emulator.latency_s)
        if path.startswith("/_emulator/"):
            self._send(self._control(method, path, raw))
            return
        emulator.saw_idempotency_key(self.headers.get("Idempotency-Key") or "")
        client = self._rated_client(path)
        wait = None
        if client is not None:
            self._rate_headers, wait = emulator.rate_call(client)
        if wait is not None:  # past a window: refused before anything runs, and not counted
            self._send(_error(emulator, ApiError(429, "rate_limit", "rate limit exceeded"), {"Retry-After": str(wait)}))
            return
        fault = emulator.take_fault(method, path)
        if fault is None:
            self._send(self._dispatch(method, path, url.query, raw))
            return
        held = self._claims_key(method)  # an idempotent POST: the origin holds its key while it runs it
        if fault.commit_after_s is not None:
            # A gateway that gives up (an error status, or a cut connection) while the origin goes
            # on and commits later: the call runs, and its answer is stored, after the reply.
            if fault.delay_s:
                time.sleep(fault.delay_s)  # a slow gateway, then it gives up
            if fault.status is not None:
                self._send(self._injected(fault, "injected gateway fault", {"Connection": "close"}))
                self.close_connection = True
            else:
                self._drop()
            if held:
                self._dispatch(method, path, url.query, raw, fault.commit_after_s)
            else:
                time.sleep(fault.commit_after_s)
                self._dispatch(method, path, url.query, raw)
            return
        runs = fault.status is None and fault.drop != "before" and fault.body is None
        if fault.delay_s and not (held and runs):
            time.sleep(fault.delay_s)  # a slow gateway (a running call's delay is the origin's, below)
        if fault.drop == "before":
            self._drop()
            return
        if fault.status is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
            answer = self._injected(fault, "injected fault", headers)
            # "Try again", "the key is used" and "nothing stored" are never a call's own stored answer.
            busy = fault.status in (409, 429) and fault.retry_after is not None
            bookkeeping = fault.kind in (KEY_USED, NOTHING_STORED)
            origin = fault.stored if fault.stored is not None else 400 <= fault.status < 500 and fault.status != 429 \
                and not busy and not bookkeeping
            if held and origin:  # the origin's own answer: under the idempotency rules, and stored
                answer = self._origin_answer(method, path, answer)
            self._send(answer)
            return
        if fault.body is not None:
            self._send(_Answer(200, fault.body.encode(), {"Content-Type": "application/json"}))
            return
        answer = self._dispatch(method, path, url.query, raw, fault.delay_s if held else 0.0)
        if fault.drop == "after":
            self._drop()
            return
        if fault.cut:
            answer = _Answer(answer.status, answer.body[: len(answer.body) // 2], answer.headers)
        if fault.late_s:
            time.sleep(fault.late_s)  # the call has run (and its answer is stored); the answer comes late
        self._send(answer)

    def _injected(self, fault: Fault, message: str, headers: dict[str, str] | None) -> _Answer:
        assert fault.status is not None
        kind = fault.kind or _ERROR_TYPES.get(fault.status, "internal_error")
        return _error(self.server.emulator, ApiError(fault.status, kind, message), headers)

    def _origin_answer(self, method: str, path: str, answer: _Answer) -> _Answer:
        """An injected answer of the origin to an idempotent POST: a used or running key is blocked
        (published) or replayed (legacy) as for any call, and the answer is stored under its key."""
        client_id = path.split("/")[2] if path.count("/") >= 2 else ""
        key = self.headers.get("Idempotency-Key", "")
        try:
            return self._idempotent(client_id, key, method, path, lambda: answer, store_any=True)
        except ApiError as err:
            return _error(self.server.emulator, err)

    def _claims_key(self, method: str) -> bool:
        return method == "POST" and IDEMPOTENCY_KEY_RE.match(self.headers.get("Idempotency-Key") or "") is not None

    def _dispatch(self, method: str, path: str, query: str, raw: bytes, origin_delay_s: float = 0.0) -> _Answer:
        emulator = self.server.emulator
        try:
            for route_method, pattern, route in _ROUTES:
                match = pattern.match(path)
                if match and route_method == method:
                    name = route
                    break
            else:
                raise ApiError(404, "ressource_not_found", f"no route for {method} {path}")
            if name == "token":
                return self._token(raw)
            self._require_token()
            params = match.groupdict()
            key = self.headers.get("Idempotency-Key")
            if method == "POST" and key is not None:
                return self._idempotent(
                    params["c"], key, method, path, lambda: self._run(name, params, query, raw, key), origin_delay_s
                )
            return self._run(name, params, query, raw, None)
        except ApiError as err:
            return _error(emulator, err)

    def _idempotent(self, client_id: str, key: str, method: str, path: str,
                    run: Callable[[], _Answer], origin_delay_s: float = 0.0, store_any: bool = False) -> _Answer:
        """One call per key runs and its answer is stored for 24 h. Published: any later or
        concurrent POST with that key, on any path, is blocked with `409 idempotent_creation_conflict`
        (the stored answer is read through the responses endpoint). Legacy: a concurrent call waits,
        then gets the stored answer repeated; the key on another path is a 409 `conflict`."""
        emulator = self.server.emulator
        if not IDEMPOTENCY_KEY_RE.match(key):
            raise ApiError(400, "param_error", "Idempotency-Key must be 16-36 of [A-Za-z0-9-]",
                           {"Idempotency-Key": "invalid"})
        published = emulator.wire == "published"
        first = emulator.begin_call(client_id, key, wait_s=0.0 if published else 30.0)
        try:
            stored = emulator.stored(client_id, key)
            if published and (stored is not None or not first):
                raise ApiError(409, KEY_USED, "A resource has already been created with this Idempotency Key")
            if stored is not None:
                if (stored.method, stored.path) != (method, path):
                    raise ApiError(409, "conflict", "Idempotency-Key already used for another request")
                return _Answer(stored.status, stored.body, {"Content-Type": stored.content_type})
            if not first:
                return _error(emulator, ApiError(409, "conflict", "a call with this Idempotency-Key is running"),
                              {"Retry-After": "1"})
            if origin_delay_s:
                time.sleep(origin_delay_s)
            try:
                answer = run()
            except ApiError as err:  # the origin's refusal (a 400, 404 or 409) is its answer: stored too
                answer = _error(emulator, err)
            if answer.status < 500 or store_any:
                kind = "application/json; charset=utf-8" if published else "application/json"
                emulator.store(client_id, key, StoredResponse(method, path, answer.status, answer.body, kind,
                                                              emulator.now()))
            return answer
        finally:
            if first:
                emulator.end_call(client_id, key)

    def _run(self, name: str, p: dict[str, str], query: str, raw: bytes, key: str | None) -> _Answer:
        emulator = self.server.emulator
        if name == "clients":
            page, per_page = _paging(query)
            rows, total = emulator.clients_page(page, per_page)
            return _json(200, rows, _page_headers(total, per_page))
        if name == "list_keys":
            page, per_page = _paging(query)
            rows, total = emulator.keys_page(p["c"], page, per_page)
            return _json(200, rows, _page_headers(total, per_page))
        if name == "get":
            return _json(200, emulator.get_key(p["c"], p["k"]))
        if name == "create":
            return _json(200, emulator.create_key(p["c"], _body(raw)))
        if name == "reset":
            return _json(200, emulator.reset_key(p["c"], p["k"], key))
        if name == "revoke":
            emulator.revoke_key(p["c"], p["k"])
            return _Answer(204, b"")
        if name == "secret":
            return _json(200, emulator.read_secret(p["c"], p["k"]))
        if name == "responses":
            return self._stored_response(p["c"], p["i"])
        raise AssertionError(name)

    def _stored_response(self, client_id: str, key: str) -> _Answer:
        """The API Response object of the call made with `key`. Published: strings for StatusCode
        and ContentLength, an HTTP date, the full URL as the gateway saw it (public host, `V2.01`),
        and 400 `correlationid_not_found` for a key never used (or malformed, or expired)."""
        emulator = self.server.emulator
        stored = emulator.stored(client_id, key) if IDEMPOTENCY_KEY_RE.match(key) else None
        if emulator.wire == "legacy":
            if stored is None:
                raise ApiError(404, "ressource_not_found", "no stored response for that key")
            return _json(200, {
                "StatusCode": stored.status, "ContentLength": len(stored.body),
                "ContentType": stored.content_type, "Date": stored.date,
                "RequestURL": stored.path, "Resource": json.loads(stored.body or b"null"),
            })
        if stored is None:
            raise ApiError(400, NOTHING_STORED, "no response is stored for this Idempotency-Key")
        return _json(200, {
            "StatusCode": str(stored.status), "ContentLength": str(len(stored.body)),
            "ContentType": stored.content_type, "Date": formatdate(stored.date, usegmt=True),
            "RequestURL": emulator.public_url + stored.path.replace(PREFIX, "/V2.01", 1),
            "Resource": json.loads(stored.body or b"null"),
        })

    def _token(self, raw: bytes) -> _Answer:
        emulator = self.server.emulator
        header = self.headers.get("Authorization", "")
        if _grant_type(raw) != "client_credentials":
            raise ApiError(400, "param_error", "grant_type must be client_credentials")
        if not header.startswith("Basic "):
            raise ApiError(401, "unauthorized", "Basic authentication required")
        try:
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(401, "unauthorized", "malformed Basic credentials") from None
        if not emulator.check_secret(client_id, secret):
            raise ApiError(401, "unauthorized", "invalid client credentials")
        return _json(200, {"access_token": secrets.token_urlsafe(24), "token_type": "bearer",
                           "expires_in": 3600})

    def _rated_client(self, path: str) -> str | None:
        """The Client ID a call is counted against: one the emulator knows, named in the path of a
        call made with the management token, or in the Basic credentials of its OAuth token call
        (the platform's own). A call that will be refused for its credentials counts for nobody."""
        emulator = self.server.emulator
        if path == "/v2.01/oauth/token":
            header = self.headers.get("Authorization", "")
            try:
                client: str | None = base64.b64decode(header[6:]).decode().partition(":")[0] \
                    if header.startswith("Basic ") else None
            except (ValueError, UnicodeDecodeError):
                client = None
        else:
            named = _RATED.match(path)
            authorized = secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {emulator.token}")
            client = named.group(1) if named and authorized else None
        return client if client is not None and emulator.has_client(client) else None

    def _require_token(self) -> None:
        expected = f"Bearer {self.server.emulator.token}"
        if not secrets.compare_digest(self.headers.get("Authorization", ""), expected):
            raise ApiError(401, "unauthorized", "missing or wrong management token")

    def _control(self, method: str, path: str, raw: bytes) -> _Answer:
        emulator = self.server.emulator
        try:
            self._require_token()
            action = path.removeprefix("/_emulator/")
            if (method, action) == ("GET", "ledger"):
                return _json(200, [asdict(e) for e in emulator.ledger])
            if (method, action) == ("DELETE", "ledger"):
                emulator.clear_ledger()
                return _Answer(204, b"")
            if (method, action) == ("POST", "faults"):
                emulator.add_fault(Fault.from_json(_body(raw)))
                return _Answer(204, b"")
            if (method, action) == ("DELETE", "faults"):
                emulator.clear_faults()
                return _Answer(204, b"")
            if (method, action) == ("POST", "clock"):
                emulator.clock_offset_s = float(_body(raw).get("offset_s", 0))
                return _json(200, {"now": emulator.now()})
            if (method, action) == ("POST", "latency"):
                emulator.latency_s = float(_body(raw).get("latency_s", 0))
                return _Answer(204, b"")
            if (method, action) == ("POST", "seed"):
                emulator.load_seed(_body(raw))
                return _Answer(204, b"")
            if (method, action) == ("POST", "rate"):  # {"limits": [..] or null, "spend": {..}, "windows_s": [..]}
                body = _body(raw)
                limits = parse_rate_limits(body["limits"]) if "limits" in body else emulator.rate_limits
                lengths = parse_rate_limits(body["windows_s"]) if "windows_s" in body else emulator.rate_windows_s
                spend = body.get("spend") or {}
                if not isinstance(spend, dict) or not all(type(n) is int and 0 <= n <= 10**9 for n in spend.values()):
                    raise ValueError("spend: an object of Client ID -> calls made (0 to 10^9)")
                emulator.rate_limits = limits
                emulator.rate_windows_s = lengths or RATE_WINDOWS_S
                for client, calls in spend.items():
                    emulator.spend_calls(str(client), calls)
                return _Answer(204, b"")
            raise ApiError(404, "ressource_not_found", f"no control action {method} {action}")
        except (ValueError, TypeError) as exc:
            return _error(emulator, ApiError(400, "param_error", str(exc)))
        except ApiError as err:
            return _error(emulator, err)

    def _send(self, answer: _Answer) -> None:
        self.send_response(answer.status, HTTPStatus(answer.status).phrase)
        if answer.body:
            self.send_header("Content-Type", answer.headers.pop("Content-Type", "application/json"))
        for name, value in {**self._rate_headers, **answer.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def _drop(self) -> None:
        """Close the connection without a byte of answer, as a crash or a cut cable would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _grant_type(raw: bytes) -> str | None:
    """`grant_type` from a form body, or from a JSON object under a form content type (the payment
    API accepts what its own SDK sends)."""
    text = raw.decode("utf-8", "replace")
    form = parse_qs(text)
    if "grant_type" in form:
        return form["grant_type"][0] if len(form["grant_type"]) == 1 else None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    value = body.get("grant_type") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


def _paging(query: str) -> tuple[int, int]:
    params = parse_qs(query)
    try:
        page = int(params.get("page", ["1"])[0])
        per_page = int(params.get("per_page", ["10"])[0])
    except ValueError:
        raise ApiError(400, "param_error", "page and per_page must be integers") from None
    if page < 1 or not 1 <= per_page <= 100:
        raise ApiError(400, "param_error", "page starts at 1; per_page is 1..100",
                       {"per_page": "1..100"})
    return page, per_page


def _page_headers(total: int, per_page: int) -> dict[str, str]:
    return {"X-Number-Of-Pages": str(-(-total // per_page)), "X-Number-Of-Items": str(total)}


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "param_error", "body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "param_error", "body must be a JSON object")
    return body


class EmulatorServer(ThreadingHTTPServer):
    """A real HTTP server for an `Emulator`; `start()` serves it from a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), EmulatorHandler)
        self.emulator = emulator
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a time-out, a test's dropped connection) is routine here."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_process(seed: Path | None, successors: bool = False) -> EmulatorServer:
    """An emulator for `kind = "emulator"`: seeded, on a free loopback port, in this process."""
    emulator = Emulator(token=secrets.token_urlsafe(16), successors=successors)
    if seed is not None:
        emulator.load_seed_file(seed)
    return EmulatorServer(emulator).start()


def build(config: KeyServiceConfig, grace_s: float = 0.0) -> HttpKeyService:
    """`kind = "emulator"`: a seeded emulator served inside this process, spoken to over HTTP."""
    from rotator.keyservice.http import HttpKeyService

    server = start_in_process(config.seed, config.successors)
    return HttpKeyService.from_config(config, url=server.url, token=server.emulator.token)


def parse_rate_limits(value: object) -> tuple[int, ...] | None:
    """Rate limits as given on the command line ("2300,4500,8800,105600", or "off") or in JSON (a
    list, or null): one positive count per published window, in order (all four: every header
    carries four values, as published)."""
    if value is None or value == "off":
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) != len(RATE_WINDOWS_S):
        raise ValueError(f"rate limits: {len(RATE_WINDOWS_S)} counts (15 min, 30 min, 1 h, 1 day), or off")
    try:
        limits = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        raise ValueError("rate limits: whole numbers") from None
    if any(not 0 < limit <= 10**9 for limit in limits):
        raise ValueError("rate limits: each from 1 to 10^9")
    return limits
