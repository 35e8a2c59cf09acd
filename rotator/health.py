"""`check-config --ping`: reach every configured service and say which answered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import quote, unquote, urlsplit

import redis

from rotator.config import REDIS_SCHEMES, Settings
from rotator.errors import RotatorError
from rotator.protocols import SecretSink
from rotator.safety import redact_urls_in, strip_credentials, terminal_safe

PING_TIMEOUT_S = 3.0


def ping_all(settings: Settings) -> Iterator[tuple[str, str | None]]:
    """(service, None) when it answered, (service, reason) when not."""
    from rotator.keyservice import build_keyservice

    try:
        service = build_keyservice(settings.keyservice)
        try:
            next(iter(service.list_clients()), None)
        finally:
            service.close()
        yield f"keyservice {settings.keyservice.kind}", None
    except RotatorError as exc:
        yield f"keyservice {settings.keyservice.kind}", str(exc)
    for name, url, full in (("state redis", settings.state.redis_url, settings.state.url),
                            ("celery broker", settings.celery.broker_url, settings.celery.broker)):
        if name == "celery broker" and settings.celery.broker_is_amqp():
            yield name, _ping_amqp(full)
            continue
        if url.scheme not in REDIS_SCHEMES:
            continue
        try:
            redis.Redis.from_url(full(), socket_timeout=3, socket_connect_timeout=3).ping()
            yield name, None
        except redis.RedisError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            yield name, f"{type(exc).__name__}: {terminal_safe(redact_urls_in(detail))[:200]}"
    from rotator.runtime import build_sinks

    try:
        sinks = build_sinks(settings)
    except RotatorError as exc:
        yield "sinks", str(exc)
        return
    for sink in sinks:
        try:
            sink.ping()
            yield sink.describe(), None
        except RotatorError as exc:
            yield sink.describe(), str(exc)
        finally:
            sink.close()
    yield "sink places", _shared_places(settings, sinks)


def _shared_places(settings: Settings, sinks: list[SecretSink]) -> str | None:
    """Whether two keys would share a place in a sink (aliases that slug alike under `{alias}`)."""
    from rotator.keyservice import build_keyservice
    from rotator.places import PlaceIndex
    from rotator.scan import client_ids

    try:
        service = build_keyservice(settings.keyservice)
        try:
            places = PlaceIndex(sinks).add_all(
                key for cid in client_ids(service, settings.keyservice.clients) for key in service.list_keys(cid))
        finally:
            service.close()
    except RotatorError as exc:
        return f"not checked: {exc}"
    if not places.conflicts:
        return None
    first = next(iter(places.conflicts.values()))
    return f"{len(places.conflicts)} keys share a place with another key; e.g. {first}"


def _ping_amqp(full_url: Callable[[], str]) -> str | None:
    """Open one connection to a RabbitMQ broker (a login on its vhost), one try of at most
    `PING_TIMEOUT_S`: None when it answered, else one line naming the error and where, without the
    password."""
    from kombu.connection import Connection

    try:
        url = full_url()
    except RotatorError as exc:  # the password variable or file went missing since loading
        return str(exc)
    parts = urlsplit(url)
    password = parts.password or ""
    try:
        with Connection(url, connect_timeout=PING_TIMEOUT_S) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=0, timeout=PING_TIMEOUT_S)
        return None
    except Exception as exc:  # any failure is the answer: refused, TLS, login, vhost, timeout
        text = " ".join(str(exc).split()) or "no message"
        for secret in {password, unquote(password), quote(unquote(password), safe="")} - {""}:
            text = text.replace(secret, "***")
        text = terminal_safe(redact_urls_in(text))[:200]
        return f"{type(exc).__name__}: {text} ({strip_credentials(url)})"
