"""`check-config --ping`: reach every configured service and say which answered."""

from __future__ import annotations

from collections.abc import Iterator

import redis

from rotator.config import Settings
from rotator.errors import RotatorError


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
        if url.scheme not in ("redis", "rediss", "unix"):
            continue
        try:
            redis.Redis.from_url(full(), socket_timeout=3, socket_connect_timeout=3).ping()
            yield name, None
        except redis.RedisError as exc:
            yield name, type(exc).__name__ + ": " + str(exc).split(" ")[0]
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

