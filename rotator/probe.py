"""`rotator health`: a liveness/readiness probe for workers and beat (systemd, Kubernetes).

Cheap and bounded: a Redis PING for the state, one connection to the broker, and with `--worker`
a Celery ping addressed to this host's worker only. It never calls the key service or a sink,
so an outage there does not restart healthy workers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from rotator.config import Settings
from rotator.errors import RotatorError
from rotator.safety import redact_urls_in

TIMEOUT_S = 3.0


def probe(settings: Settings, worker: bool = False, node: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(check, None) when it passed, (check, reason) when not."""
    yield "state redis", _redis(settings.state.url)
    if settings.celery.broker_is_amqp():
        from rotator.health import _ping_amqp

        yield "celery broker", _ping_amqp(settings.celery.broker)
    else:
        yield "celery broker", _redis(settings.celery.broker)
    if worker:
        name = node or f"celery@{socket.gethostname()}"
        yield f"worker {name}", _worker(settings, name)


def _redis(url: object) -> str | None:
    import redis

    try:
        full = url() if callable(url) else str(url)
        redis.Redis.from_url(full, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S).ping()
        return None
    except RotatorError as exc:  # a password variable or file that went missing
        return str(exc)
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {redact_urls_in(str(exc).splitlines()[0] if str(exc) else '')}"


def _worker(settings: Settings, name: str) -> str | None:
    """This host's worker answers a broadcast ping addressed to it alone."""
    from celery import Celery

    app = Celery("rotator-probe", broker=settings.celery.broker(), set_as_current=False)
    try:
        replies = app.control.ping(destination=[name], timeout=TIMEOUT_S)
    except Exception as exc:  # the broker went away between the checks
        return f"{type(exc).__name__}: the ping could not be sent"
    finally:
        app.close()
    if any(name in reply for reply in replies):
        return None
    return f"no answer within {TIMEOUT_S:.0f}s (is `rotator worker` running here, under this node name?)"
