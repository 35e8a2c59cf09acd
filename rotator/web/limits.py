"""What keeps `rotator web` and `rotator metrics` answering while clients misbehave.

uvicorn reads a request's head for as long as the client cares to send it, and accepts every
connection until the process runs out of file descriptors: a few hundred idle sockets
(slowloris) and the page stops answering anyone. Here, on top of uvicorn's HTTP/1.1 protocol:

- a request must arrive whole, head and body, within `read_timeout_s` of the connection (the
  first) or of its first byte (the next ones on a kept-alive connection); after a response,
  uvicorn's keep-alive time-out closes an idle connection;
- an answer the client does not read (the socket's buffers full) for `read_timeout_s` ends the
  connection: a slow reader holds its slot no longer than a slow writer;
- at most `max_connections` are open, kept below the process's file-descriptor limit; one more
  drops a connection already closed whose client has not read all it was sent, else the one that
  has waited longest (for a request, idle or trickling one in, or for the client to read its
  answer), or, when every other one has a request running, the newcomer;
- a request head over `MAX_HEAD_BYTES` is a 431 (a 400 when it comes in pieces), a request with a
  body a 413, both before the app sees them; requests in flight are bounded by the connections
  (one at a time per connection).
"""

from __future__ import annotations

import asyncio
import resource
import socket
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rotator.config import Settings
from rotator.web.guard import ASGIApp, Message, Receive, Scope, Send

#: The largest request head (request line and headers) read; h11 answers 400 past it.
MAX_HEAD_BYTES = 16 * 1024
#: File descriptors left for everything but client connections (Redis, the key service, files).
RESERVED_FDS = 128


@dataclass(frozen=True)
class Limits:
    read_timeout_s: float = 10.0
    max_connections: int = 256
    keep_alive_s: float = 5.0

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.web.read_timeout_s, settings.web.max_connections)

    def connection_cap(self) -> int:
        """`max_connections`, lowered to fit under this process's soft file-descriptor limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(8, min(self.max_connections, soft - RESERVED_FDS))


_WAITING = (h11.IDLE, h11.SEND_BODY)  # the client's side: no whole request read yet


def bounded_protocol(limits: Limits, cap: int) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with the limits above (a class per server: uvicorn builds it)."""

    class Bounded(H11Protocol):
        waiting_since: float | None = None  # when it began to wait for the client (a request, or a read)
        _expiry: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None
        dropped = False  # aborted for room (it stays among the connections until the loop notices)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait()
            if len(self.connections) > cap:
                self._make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            self._unstall()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._expiry is None and self.conn.their_state in _WAITING:
                self._wait()  # the next request on a kept-alive connection: its own deadline
            super().data_received(data)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall is None:
                self._stall = self.loop.call_later(limits.read_timeout_s, self.transport.abort)
                self.waiting_since = self.waiting_since or self.loop.time()

        def resume_writing(self) -> None:
            super().resume_writing()
            self._unstall()
            if self.conn.their_state not in _WAITING:
                self.waiting_since = None

        def _unstall(self) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state not in _WAITING:
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state in _WAITING:
                # Idle: uvicorn's keep-alive time-out closes it; until then it may be closed for room.
                self._stop_waiting()
                self.waiting_since = self.loop.time()

        def _wait(self) -> None:
            self._stop_waiting()
            self.waiting_since = self.loop.time()
            self._expiry = self.loop.call_later(limits.read_timeout_s, self._expire)

        def _stop_waiting(self) -> None:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            self.waiting_since = None

        def _expire(self) -> None:
            self._expiry = None
            if self.conn.their_state in _WAITING and not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            """Drop one connection: one already closing whose client has not read all it was sent (a
            close() waits for that, for ever), else the one waiting longest for its client, else,
            when every other one has a request running, this one. abort(), never close()."""
            others = [c for c in self.connections if isinstance(c, Bounded) and c is not self and not c.dropped]
            closing = [c for c in others if c.transport.is_closing()]
            waiting = [c for c in others if c.waiting_since is not None and not c.transport.is_closing()]
            victim = closing[0] if closing else min(waiting, key=lambda c: c.waiting_since or 0.0) if waiting else self
            victim.dropped = True
            victim.transport.abort()

    return Bounded


def bounded_requests(app: ASGIApp) -> ASGIApp:
    """Refuses a request head over `MAX_HEAD_BYTES` (h11 caps only one that comes in pieces) and a
    request with a body (nothing here reads one: it would only hold a connection and memory)."""

    async def checked(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            head = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + sum(
                len(name) + len(value) + 4 for name, value in headers)
            if head > MAX_HEAD_BYTES:
                await refuse(send, 431, "the request head is too large\n")
                return
            if any(name.lower() == b"transfer-encoding" or (name.lower() == b"content-length" and
                                                            value.strip() not in (b"", b"0"))
                   for name, value in headers):
                await refuse(send, 413, "no request body is accepted\n")
                return
        await app(scope, receive, send)

    return checked


async def refuse(send: Send, status: int, text: str) -> None:
    """A short plain answer, and the connection closed after it."""
    body = text.encode()
    start: Message = {"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"), (b"connection", b"close")]}
    await send(start)
    await send({"type": "http.response.body", "body": body})


def server(app: ASGIApp, limits: Limits | None = None) -> uvicorn.Server:
    """A uvicorn server for `app` with the limits above (the same for the page and the metrics)."""
    limits = limits or Limits()
    cap = limits.connection_cap()
    return uvicorn.Server(uvicorn.Config(
        bounded_requests(app), http=bounded_protocol(limits, cap), ws="none", log_level="warning", access_log=False,
        server_header=False, proxy_headers=False, lifespan="off", timeout_graceful_shutdown=5,
        # Connections bound the requests in flight (one at a time each); the margin covers a
        # connection closed for room that has not yet gone.
        timeout_keep_alive=int(max(1, limits.keep_alive_s)), limit_concurrency=2 * cap,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES))


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before uvicorn starts, so `--port 0` works and the address in use is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
