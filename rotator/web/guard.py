"""What stands in front of every route: GET and HEAD only, the credential when one is set, a Host
check when none is, and headers that keep the page to its own files. (Sizes and bodies are
refused before it: rotator.web.limits.)

A pure ASGI middleware, so it also covers static files and a mounted metrics app.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
SAFE_METHODS = ("GET", "HEAD")
#: Answered without the credential: it says only that the process serves.
OPEN_PATHS = ("/healthz",)
LOOPBACK_NAMES = ("localhost", "localhost.")


@dataclass(frozen=True)
class Credential:
    """The page's one credential: `Authorization: Bearer <token>`, or Basic with `username` and the
    token as password (what a browser prompts for)."""

    token: str = field(repr=False)
    username: str = "rotator"

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.encode(), self.token.encode())
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Both compared whatever the first says, so the time taken tells nothing.
            user_ok = hmac.compare_digest(user.encode(), self.username.encode())
            password_ok = hmac.compare_digest(password.encode(), self.token.encode())
            return bool(sep) and user_ok and password_ok
        return False


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: only this machine can reach it."""
    name = host.strip("[]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port (`[::1]:9465` -> `::1`)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class Guard:
    """Wraps the app. Without a credential (a loopback bind) it also refuses a Host header that is
    not loopback, so a web page elsewhere cannot read this one through DNS rebinding."""

    def __init__(self, app: ASGIApp, credential: Credential | None) -> None:
        self.app = app
        self.credential = credential

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] not in SAFE_METHODS:
            await _plain(send, 405, "read-only: GET and HEAD only\n", [(b"allow", b"GET, HEAD")])
            return
        if self.credential is None and not is_loopback(host_name(headers.get("host", ""))):
            await _plain(send, 421, "this page answers only to a loopback Host\n")
            return
        open_path = scope.get("path", "") in OPEN_PATHS
        if self.credential is not None and not open_path and not self.credential.allows(headers.get("authorization")):
            await _plain(send, 401, "a bearer token or Basic credentials are needed\n", [
                (b"www-authenticate", b'Basic realm="rotator", charset="UTF-8"'),
                (b"www-authenticate", b'Bearer realm="rotator"')])
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(HEADERS)]
                message["headers"] = [*kept, *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _plain(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        *(extra or []), *HEADERS]})
    await send({"type": "http.response.body", "body": body})
