"""`rotator health`: a liveness/readiness probe for workers and beat (systemd, Kubernetes).

Cheap and bounded: a Redis PING for the state, one connection to the broker, and with `--worker`
a Celery ping addressed to this host's worker only. It never calls the key service or a sink,
so an outage there does not restart healthy workers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from rotator.config import Settings
from rotator.health import PING_TIMEOUT_S as TIMEOUT_S
from rotator.health import ping_broker, ping_redis


def probe(settings: Settings, worker: bool = False, node: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(check, None) when it passed, (check, reason) when not."""
    yield "state redis", ping_redis(settings.state.url)
    yield "celery broker", ping_broker(settings)
    if worker:
        name = node or f"celery@{socket.gethostname()}"
        yield f"worker {name}", _worker(settings, name)


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
