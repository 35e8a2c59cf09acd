"""The status page and the metrics endpoint under clients that misbehave: idle and trickling
sockets (slowloris), oversized or bodied requests, and a flood of key pages. Each runs the real
command (`rotator web`, `rotator metrics`) or the app under the server the command builds.

The latency under load is a benchmark figure (benchmarks/page_load.py); here the deadlines are
generous and the counts bounded."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from rotator.embedded import end_process, free_port
from rotator.keyservice.emulator import Fault
from tests.test_web import Fleet, fleet, page

__all__ = ["fleet", "page"]  # fixtures shared with test_web
pytestmark = pytest.mark.slow
IDLE_SOCKETS = 1100
FD_LIMIT = 1024  # a systemd service's default soft limit: EMFILE comes at about a thousand sockets


@contextmanager
def command(fleet: Fleet, *args: str, read_timeout_s: float = 2.0) -> Iterator[tuple[int, int]]:
    """`rotator <args>` in its own process under a 1,024-descriptor limit; yields (pid, port)."""
    port = free_port()
    env = {**os.environ, "ROTATOR_WEB__READ_TIMEOUT_S": str(read_timeout_s), "PYTHONUNBUFFERED": "1"}
    log = fleet.config.parent / f"{args[0]}.log"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen([sys.executable, "-m", "rotator.cli", *args, "--port", str(port), "--config",
                             str(fleet.config)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            preexec_fn=limited, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        yield proc.pid, port
    finally:
        end_process(proc)


def slowloris(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each send part of a request head and then nothing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 512), hard))
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ended the connection (what it had sent is read and dropped)."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("what", [("web", "/api/status"), ("metrics", "/metrics")], ids=["web", "metrics"])
def test_the_page_answers_while_1100_idle_sockets_are_open(fleet: Fleet, what: tuple[str, str]) -> None:
    """1,100 connections that trickle part of a request head and stop, against the command under
    a 1,024-descriptor limit: it still answers a real request at once, holds no more descriptors
    than its connection cap allows, and closes every such connection within its read time-out."""
    name, path = what
    with command(fleet, name) as (pid, port):
        sockets = slowloris(port, IDLE_SOCKETS)
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=20)
            assert answer.status_code == 200, answer.text[:300]
            assert len(os.listdir(f"/proc/{pid}/fd")) < FD_LIMIT - 100
            deadline = time.monotonic() + 2.0 + 15
            open_ = list(sockets)
            while open_ and time.monotonic() < deadline:
                open_ = [s for s in open_ if not closed_by_server(s)]
                time.sleep(0.2)
            assert open_ == [], f"{len(open_)} idle connections still open past the read time-out"
            assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=20).status_code == 200
        finally:
            for sock in sockets:
                sock.close()


def test_oversized_heads_and_request_bodies_are_refused(fleet: Fleet) -> None:
    """A request head over 16 KiB is a 431 (a 400 when it trickles in); a request that carries a
    body is a 413 and its connection is closed (nothing here reads a body), on the page and the
    metrics alike."""
    with command(fleet, "web") as (_, web), command(fleet, "metrics") as (_, metrics):
        for port, path in ((web, "/api/status"), (metrics, "/metrics")):
            url = f"http://127.0.0.1:{port}{path}"
            assert httpx.get(url, headers={"X-Big": "a" * 20_000}, timeout=10).status_code == 431
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
                for _ in range(3):  # a head that grows past the cap in pieces
                    time.sleep(0.05)
                    sock.sendall(b"X-Big: " + b"a" * 8000 + b"\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 400")
            bodied = httpx.request("GET", url, content=b"x" * 1000, timeout=10)
            assert bodied.status_code == 413 and bodied.headers["connection"] == "close"
            assert httpx.get(url, timeout=10).status_code == 200


def test_a_flood_of_key_pages_does_not_hold_up_the_fleet_view(fleet: Fleet, page: str) -> None:
    """Key pages whose key-service call hangs, 60 at once: a few run, some wait, the rest are a
    503 at once; the fleet's view, which shares no thread with them, still answers."""
    fleet.emulator.add_fault(Fault(method="GET", path=r"/apikeys/[^/]+$", delay_s=10, times=-1))
    key = fleet.keys["young"]
    with ThreadPoolExecutor(60) as pool:
        try:
            flood = [pool.submit(httpx.get, f"{page}/api/keys/acme/{key}", timeout=60) for _ in range(60)]
            time.sleep(1.0)  # every key page is in: hanging, waiting, or refused
            started = time.monotonic()
            view = httpx.get(f"{page}/api/status", timeout=60)
            took = time.monotonic() - started
            refused = [f.result() for f in flood if f.done()]
        finally:
            fleet.emulator.clear_faults()  # what waits runs fast now
    assert view.status_code == 200 and took < 5, f"the fleet view took {took:.1f}s behind the key pages"
    assert refused and all(r.status_code == 503 and "busy" in r.text for r in refused)
    assert all(f.result().status_code in (200, 503) for f in flood)


def test_a_kept_alive_connection_that_trickles_its_next_request_is_closed(fleet: Fleet) -> None:
    """One request answered, then the next one's head a byte at a time: the read time-out counts
    from its first byte, not only from the connection."""
    with command(fleet, "web") as (_, port), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok\n"):
            answer += sock.recv(4096)
        started = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_by_server(sock):
                closed = True
                break
            sock.setblocking(True)
            time.sleep(0.25)
        took = time.monotonic() - started
        assert closed and took < 2.0 + 3, f"the trickling connection was still open after {took:.1f}s"


@contextmanager
def bounded_app(limits: Any, body: bytes, sndbuf: int | None = None) -> Iterator[tuple[int, Any]]:
    """A stand-in app under the page's server (rotator.web.limits): `/big` answers `body`, the rest
    `ok`; yields (port, server)."""
    import threading

    from rotator.web.guard import Receive, Scope, Send
    from rotator.web.limits import listening_socket, server

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        answer = body if scope["path"] == "/big" else b"ok\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    sock = listening_socket("127.0.0.1", 0)
    if sndbuf is not None:  # accepted sockets inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    running = server(app, limits)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not running.started:
            time.sleep(0.02)
        yield sock.getsockname()[1], running
    finally:
        running.should_exit = True
        thread.join(10)
        sock.close()


def readers_that_never_read(port: int, count: int) -> list[socket.socket]:
    readers = []
    for _ in range(count):
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        reader.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        readers.append(reader)
    return readers


def answered(port: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3).text == "ok\n"
        except httpx.TransportError:
            time.sleep(0.2)
    return False


def test_connections_closed_before_their_client_read_everything_give_way() -> None:
    """An answer small enough to sit in the socket buffers whole, never read: the response is
    complete, the keep-alive time-out closes the connection, and a close() then waits for the
    client for ever. With room for 8, eight such connections do not shut a ninth client out."""
    from rotator.web.limits import Limits

    with bounded_app(Limits(read_timeout_s=30, max_connections=8, keep_alive_s=1), b"x" * 40_000,
                     sndbuf=4096) as (port, running):
        readers = readers_that_never_read(port, 8)
        try:
            time.sleep(2.5)  # answered, then closed by the keep-alive time-out, unread
            assert len(running.server_state.connections) == 8
            assert answered(port), "a client was shut out by eight connections closing for ever"
        finally:
            for reader in readers:
                reader.close()


def test_clients_that_stop_reading_their_answers_do_not_lock_others_out() -> None:
    """Under the page's server, with room for 8 connections: eight clients ask for a 4 MB answer
    and never read it. One is dropped for room, so a ninth client is answered, and the rest end
    after the read time-out: a close() would wait for them to read, for ever."""
    from rotator.web.limits import Limits

    with bounded_app(Limits(read_timeout_s=1.0, max_connections=8), b"x" * (4 << 20)) as (port, running):
        readers = readers_that_never_read(port, 8)
        try:
            time.sleep(0.5)  # every answer is stuck in a full socket
            assert answered(port), "a client was shut out by eight that stopped reading"
            # Without reading a byte more (a read would let the answer drain): the server holds none of them.
            deadline = time.monotonic() + 1.0 + 5
            while running.server_state.connections and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not running.server_state.connections, "a reader that stopped reading kept its connection"
        finally:
            for reader in readers:
                reader.close()


def test_a_slow_scrape_holds_up_nothing_else(fleet: Fleet) -> None:
    """The metrics endpoint collects in a thread: while one scrape waits 4 s on the key service's
    listing, another request is answered at once (here, a 421 for a Host it refuses)."""
    import threading

    from rotator.metrics import serve

    fleet.emulator.add_fault(Fault(method="GET", path=r"/apikeys$", delay_s=4, times=1))
    running = serve(fleet.settings, free_port(), cache_s=0)
    try:
        url = f"http://127.0.0.1:{running.port}/metrics"
        scrape = threading.Thread(target=httpx.get, args=(url,), kwargs={"timeout": 30})
        scrape.start()
        time.sleep(0.5)  # the scrape is waiting on the listing
        started = time.monotonic()
        refused = httpx.get(url, headers={"Host": "rebind.example"}, timeout=30)
        took = time.monotonic() - started
        assert refused.status_code == 421 and took < 2, f"answered after {took:.1f}s, behind the scrape"
        scrape.join(30)
    finally:
        running.shutdown()
