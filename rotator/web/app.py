"""The routes: the page, its refreshable fragment, a key's page, their JSON, and static files.

Only GET routes exist, and `Guard` refuses every other method before any of them runs. Templates
autoescape every value; the page's only script is `static/app.js` (the CSP allows nothing else).

Every route is async: `/healthz` answers on the event loop and touches nothing else; the fleet's
pages and JSON are rendered once per snapshot (`FleetSource`) and served as the same bytes; a
key's page is built in threads kept for key pages (`KEY_THREADS`, with `KEY_WAITING` more waiting,
then a 503 at once), so a flood of them never holds up the fleet's view. A service that does not answer (the key
service, Redis, a socket) is a 503 with one log line, never a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from anyio import CapacityLimiter, to_thread
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rotator import logs
from rotator.budget import describe, from_dict
from rotator.console import unreachable
from rotator.domain import KeyRef
from rotator.errors import BudgetSpent, NotFoundError, RotatorError
from rotator.safety import is_id, redact_urls_in
from rotator.web import view
from rotator.web.guard import ASGIApp, Credential, Guard, Message, Receive, Scope, Send
from rotator.web.source import CachedSource

STATIC = Path(__file__).parent / "static"
MAX_HISTORY = 1000
HTML = "text/html; charset=utf-8"
JSON = "application/json"
#: A cached body goes out in pieces this big: a slow reader holds back one piece, not a copy of it.
CHUNK = 64 * 1024
#: Key pages built at once, and how many more may wait for one of those threads; past that a key
#: page is a 503 at once: a flood of them neither queues without end nor delays the fleet's view.
KEY_THREADS = 4
KEY_WAITING = 32
#: Where the fleet goes in the page's shell (rendered from the template and the mount prefix only,
#: never from the key service's data): the page is that shell around the fragment's own bytes.
SLOT = Markup("<!-- the fleet -->")

log = logs.get("rotator.web")


def templates() -> Environment:
    env = Environment(loader=PackageLoader("rotator.web", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(iso=view.iso, urgency=view.urgency, last_message=view.last_message,
                       entry_keys=view.entry_keys, relative=view.relative, sink_tone=view.sink_tone)
    return env


def service_failure(exc: BaseException) -> str | None:
    """One line for an error of a service the page reads (rotator's own errors, Redis, the broker,
    a socket); None for anything else, which is a bug and keeps its traceback."""
    if isinstance(exc, RotatorError | BudgetSpent):  # a 429's pause holds back even a person's look
        return str(exc)
    down = unreachable(exc)
    if down is None and isinstance(exc, OSError):
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        down = f"a service did not answer ({type(exc).__name__}: {redact_urls_in(detail)})"
    return down


class Body(Response):
    """Bytes rendered once and shared by every request (in parts: the page is its shell around the
    fragment's bytes, never a copy of them), sent in `CHUNK`s: the server's flow control then
    holds at most a piece of it per slow reader."""

    def __init__(self, parts: Sequence[bytes], media_type: str) -> None:
        self.parts = tuple(parts)
        super().__init__(None, media_type=media_type,
                         headers={"content-length": str(sum(len(part) for part in self.parts))})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for part in self.parts:
            view = memoryview(part)
            for start in range(0, len(view), CHUNK):
                piece: Message = {"type": "http.response.body", "body": bytes(view[start:start + CHUNK]),
                                  "more_body": True}
                await send(piece)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(source: CachedSource, *, credential: Credential | None = None, refresh_s: float = 30,
               metrics: ASGIApp | None = None) -> ASGIApp:
    """The page as an ASGI app, wrapped in its guard; mountable under any prefix, and next to a
    Prometheus app when `metrics` is given (served at `/metrics` behind the same guard)."""
    pages = templates()
    key_threads: list[CapacityLimiter] = []  # made on first use, inside the event loop
    key_pages = [0]  # key lookups running or waiting for a thread (only the event loop counts)

    def key_limiter() -> CapacityLimiter:
        if not key_threads:
            key_threads.append(CapacityLimiter(KEY_THREADS))
        return key_threads[0]

    def base_of(request: Request) -> str:
        # Paths under wherever the app is mounted (an outer router does not know these routes' names).
        return str(request.scope.get("root_path", "")).rstrip("/")

    def context(base: str, now: float, **extra: Any) -> dict[str, Any]:
        return {"refresh_s": refresh_s, "now": now, "home": f"{base}/", "fragment_url": f"{base}/fragment/fleet",
                "warn_days": source.warn_before_days, "static": lambda name: f"{base}/static/{quote(name)}",
                "key_url": lambda c, k: f"{base}/keys/{quote(c, safe='')}/{quote(k, safe='')}",
                "budget_line": lambda found: describe(from_dict(found)), **extra}

    def render(name: str, values: dict[str, Any]) -> bytes:
        return pages.get_template(name).render(values).encode()

    def failed(request: Request, exc: Exception, as_json: bool = False) -> Response:
        """A 503 for a service that did not answer, logged as one line; anything else re-raised."""
        message = service_failure(exc)
        if message is None:
            raise exc
        # The path as sent, percent-encoded: a request cannot write a line of its own into the log.
        log.warning("status page: a service did not answer", path=quote(request.url.path)[:300], error=message)
        if as_json:
            return JSONResponse({"error": message}, status_code=503)
        body = render("error.html", context(base_of(request), time.time(), title="not available", message=message))
        return Response(body, status_code=503, media_type=HTML)

    def fleet_renderer(name: str, base: str, report: dict[str, Any]) -> Callable[[], bytes]:
        return lambda: render(name, context(base, report["generated_at"], report=report, fleet=SLOT,
                                            cards=view.cards(report["summary"])))

    def shell_renderer(base: str, report: dict[str, Any]) -> Callable[[], tuple[bytes, bytes]]:
        def shell() -> tuple[bytes, bytes]:
            before, found, after = fleet_renderer("index.html", base, report)().partition(SLOT.encode())
            if not found:
                raise RuntimeError("index.html has no {{ fleet }} slot")
            return before, after
        return shell

    async def fleet_page(request: Request, whole: bool) -> Response:
        """The fleet's fragment, or the whole page: its shell around the same fragment bytes."""
        try:
            snapshot = await source.snapshot()
            base = base_of(request)
            fleet = await snapshot.body(("_fleet.html", base), fleet_renderer("_fleet.html", base, snapshot.report))
            if not whole:
                return Body([fleet], media_type=HTML)
            before, after = await snapshot.body(("index.html", base), shell_renderer(base, snapshot.report))
        except Exception as exc:
            return failed(request, exc)
        return Body([before, fleet, after], media_type=HTML)

    async def index(request: Request) -> Response:
        return await fleet_page(request, whole=True)

    async def fragment(request: Request) -> Response:
        return await fleet_page(request, whole=False)

    async def status_json(request: Request) -> Response:
        try:
            snapshot = await source.snapshot()
            report = snapshot.report
            body = await snapshot.body("json", lambda: json.dumps(
                report, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode())
        except Exception as exc:
            return failed(request, exc, as_json=True)
        return Body([body], media_type=JSON)

    async def key_lookup(request: Request, as_json: bool) -> dict[str, Any] | Response:
        client_id, key_id = request.path_params["client_id"], request.path_params["key_id"]
        if not (is_id(client_id) and is_id(key_id)):
            return PlainTextResponse("no such key\n", status_code=404)
        try:
            return await to_thread.run_sync(source.key, KeyRef(client_id, key_id), limiter=key_limiter())
        except NotFoundError:
            return PlainTextResponse("no such key\n", status_code=404)
        except Exception as exc:
            return failed(request, exc, as_json)

    async def admitted(request: Request, build: Callable[[Request], Awaitable[Response]]) -> Response:
        """A key page (HTML or JSON), built whole (lookup and render) within the count of those
        running or waiting for a thread; past it, a 503 at once."""
        if key_pages[0] >= KEY_THREADS + KEY_WAITING:
            return PlainTextResponse("busy: too many key pages asked for at once; try again\n", status_code=503,
                                     headers={"retry-after": "5"})
        key_pages[0] += 1
        try:
            return await build(request)
        finally:
            key_pages[0] -= 1

    async def build_key_page(request: Request) -> Response:
        found = await key_lookup(request, as_json=False)
        if isinstance(found, Response):
            return found
        values = context(base_of(request), time.time(), key=found)
        return Response(await to_thread.run_sync(render, "key.html", values, limiter=key_limiter()), media_type=HTML)

    async def build_key_json(request: Request) -> Response:
        found = await key_lookup(request, as_json=True)
        return found if isinstance(found, Response) else JSONResponse(found)

    async def key_page(request: Request) -> Response:
        return await admitted(request, build_key_page)

    async def key_json(request: Request) -> Response:
        return await admitted(request, build_key_json)

    async def healthz(request: Request) -> Response:
        # On the event loop: never behind a report, a render or a busy thread pool.
        return PlainTextResponse("ok\n")

    routes: list[Route | Mount] = [
        Route("/", index, name="index"),
        Route("/fragment/fleet", fragment, name="fragment"),
        Route("/keys/{client_id}/{key_id}", key_page, name="key"),
        Route("/api/status", status_json, name="status_json"),
        Route("/api/keys/{client_id}/{key_id}", key_json, name="key_json"),
        Route("/healthz", healthz, name="healthz"),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if metrics is not None:
        routes.append(Mount("/metrics", app=metrics, name="metrics"))
    return Guard(Starlette(routes=routes), credential)
