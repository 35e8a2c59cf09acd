"""Start `rotator web`: decide the bind and the credential, build the engine, run uvicorn.

A page bound anywhere but loopback is reachable by others, so it refuses to start without a
credential; one on loopback takes a credential too when one is named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rotator.config import Settings, read_credential
from rotator.errors import ConfigError, ConfigProblem, PermanentError
from rotator.web.guard import ASGIApp, Credential, is_loopback
from rotator.web.limits import Limits, listening_socket, server
from rotator.web.source import CachedSource, FleetSource, PublishedSource, Quiet

WHERE = "rotator web"
#: The shortest token accepted: a guessable one guards nothing.
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class WebOptions:
    """The command's options over the `[web]` section."""

    host: str
    port: int
    token_env: str | None = None
    token_file: Path | None = None
    metrics: bool = False

    @classmethod
    def of(cls, settings: Settings, host: str | None = None, port: int | None = None, token_env: str | None = None,
           token_file: Path | None = None, metrics: bool = False) -> WebOptions:
        web = settings.web
        named = token_env is not None or token_file is not None  # options replace the file's pair
        return cls(host if host is not None else web.host, port if port is not None else web.port,
                   token_env if named else web.token_env, token_file if named else web.token_file, metrics)


def credential(settings: Settings, options: WebOptions) -> Credential | None:
    """The credential named by the options or the `[web]` section; None when none is named. Refuses
    to go on without one on a bind other than loopback, or with one that is named but empty or
    shorter than `MIN_TOKEN_CHARS`. The page speaks plain HTTP: off loopback, put it behind TLS."""
    if options.token_env is None and options.token_file is None:
        if not is_loopback(options.host):
            raise ConfigError([ConfigProblem(WHERE, "web.token_env", (
                f"binding {options.host} makes the page reachable from other machines: name a bearer token with "
                "--token-env/--token-file (or [web] token_env/token_file), or bind 127.0.0.1"))])
        return None
    key = "web.token_file" if options.token_file is not None else "web.token_env"
    try:
        token = read_credential(options.token_env, options.token_file, "web token")
    except (PermanentError, OSError) as exc:
        reason = str(exc) if isinstance(exc, PermanentError) else f"cannot read the token file ({type(exc).__name__})"
        raise ConfigError([ConfigProblem(WHERE, key, reason)]) from None
    if len(token) < MIN_TOKEN_CHARS:  # the value is never shown, not even its length
        raise ConfigError([ConfigProblem(WHERE, key, (
            f"the web token is shorter than {MIN_TOKEN_CHARS} characters; use a long random one "
            "(e.g. `openssl rand -base64 32`)"))])
    return Credential(token, settings.web.username)


def build_app(settings: Settings, options: WebOptions) -> tuple[ASGIApp, CachedSource]:
    """The guarded app over the view the workers publish (`view.source = "published"`), else over a
    fresh engine (events dropped: looking does not alert)."""
    from rotator.runtime import build_engine, build_state
    from rotator.web.app import create_app

    guard = credential(settings, options)
    source: CachedSource
    if settings.view.published:
        source = PublishedSource(build_state(settings), cache_s=settings.web.cache_s,
                                 history_max=settings.state.history_max)
    else:
        source = FleetSource(build_engine(settings, publisher=Quiet(), looking=True), cache_s=settings.web.cache_s,
                             history_max=settings.state.history_max)
    metrics = None
    if options.metrics:
        from prometheus_client import CollectorRegistry

        from rotator.metrics import RotatorCollector, exposition_app
        from rotator.runtime import build_state

        registry = CollectorRegistry(auto_describe=False)
        registry.register(RotatorCollector(settings, build_state(settings)))
        metrics = exposition_app(registry)
    return create_app(source, credential=guard, refresh_s=settings.web.refresh_s, metrics=metrics), source


def serve(settings: Settings, options: WebOptions, announce: Callable[[str], None] = print) -> None:
    """Run until interrupted."""
    app, source = build_app(settings, options)
    sock = listening_socket(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    announce(f"status page on http://{shown}:{port}/ (JSON at /api/status; Ctrl-C stops it)")
    try:
        server(app, Limits.of(settings)).run(sockets=[sock])
    finally:
        sock.close()
        source.close()
