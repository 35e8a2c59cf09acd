"""The routes: the page, its refreshable fragment, a key's page, their JSON, and static files.

Only GET routes exist, and `Guard` refuses every other method before any of them runs. Templates
autoescape every value; the page's only script is `static/app.js` (the CSP allows nothing else).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from rotator.domain import KeyRef
from rotator.errors import NotFoundError, RotatorError
from rotator.safety import is_id
from rotator.web import view
from rotator.web.guard import ASGIApp, Credential, Guard
from rotator.web.source import FleetSource

STATIC = Path(__file__).parent / "static"
MAX_HISTORY = 1000


def templates() -> Jinja2Templates:
    env = Environment(loader=PackageLoader("rotator.web", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(iso=view.iso, urgency=view.urgency, last_message=view.last_message,
                       entry_keys=view.entry_keys, relative=view.relative)
    return Jinja2Templates(env=env)


def create_app(source: FleetSource, *, credential: Credential | None = None, refresh_s: int = 30,
               metrics: ASGIApp | None = None) -> ASGIApp:
    """The page as an ASGI app, wrapped in its guard; mountable under any prefix, and next to a
    Prometheus app when `metrics` is given (served at `/metrics` behind the same guard)."""
    pages = templates()

    def context(request: Request, now: float, **extra: Any) -> dict[str, Any]:
        # Paths under wherever the app is mounted (an outer router does not know these routes' names).
        base = str(request.scope.get("root_path", "")).rstrip("/")
        return {"refresh_s": refresh_s, "now": now, "home": f"{base}/", "fragment_url": f"{base}/fragment/fleet",
                "warn_days": source.warn_before_days, "static": lambda name: f"{base}/static/{quote(name)}",
                "key_url": lambda c, k: f"{base}/keys/{quote(c, safe='')}/{quote(k, safe='')}", **extra}

    def fleet_context(request: Request) -> dict[str, Any]:
        report = source.report()
        return context(request, report["generated_at"], report=report, cards=view.cards(report["summary"]))

    def unavailable(request: Request, exc: RotatorError) -> Response:
        return pages.TemplateResponse(request, "error.html", context(
            request, time.time(), title="not available", message=str(exc)), status_code=503)

    def index(request: Request) -> Response:
        try:
            return pages.TemplateResponse(request, "index.html", fleet_context(request))
        except RotatorError as exc:
            return unavailable(request, exc)

    def fragment(request: Request) -> Response:
        try:
            return pages.TemplateResponse(request, "_fleet.html", fleet_context(request))
        except RotatorError as exc:
            return unavailable(request, exc)

    def status_json(request: Request) -> Response:
        try:
            return JSONResponse(source.report())
        except RotatorError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    def key_lookup(request: Request) -> dict[str, Any] | Response:
        client_id, key_id = request.path_params["client_id"], request.path_params["key_id"]
        if not (is_id(client_id) and is_id(key_id)):
            return PlainTextResponse("no such key\n", status_code=404)
        try:
            return source.key(KeyRef(client_id, key_id))
        except NotFoundError:
            return PlainTextResponse("no such key\n", status_code=404)
        except RotatorError as exc:
            return unavailable(request, exc)

    def key_page(request: Request) -> Response:
        found = key_lookup(request)
        if isinstance(found, Response):
            return found
        return pages.TemplateResponse(request, "key.html", context(request, time.time(), key=found))

    def key_json(request: Request) -> Response:
        found = key_lookup(request)
        return found if isinstance(found, Response) else JSONResponse(found)

    def healthz(request: Request) -> Response:
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
