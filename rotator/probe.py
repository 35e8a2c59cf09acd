"""`rotator health`: a liveness/readiness probe for workers and beat (systemd, Kubernetes).

Cheap and bounded: a Redis PING for the state, one connection to the broker, and with `--worker`
this host's worker's heartbeat in the state Redis (rotator.heartbeat; Celery's remote control,
which a broker client could use to stop every worker, is off). It never calls the key service or
a sink, so an outage there does not restart healthy workers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from rotator.config import Settings
from rotator.errors import RotatorError
from rotator.health import PING_TIMEOUT_S as TIMEOUT_S
from rotator.health import ping_broker, ping_redis


def probe(settings: Settings, worker: bool = False, node: str | None = None) -> Iterator[tuple[str, str | None]]:
    """(check, None) when it passed, (check, reason) when not."""
    yield "state redis", ping_redis(settings.state.url)
    if settings.reader_only:  # a reader of the published view uses no broker (`check-config --ping` checks the view)
        return
    yield "celery broker", ping_broker(settings)
    if worker:
        name = node or f"celery@{socket.gethostname()}"
        yield f"worker {name}", _worker(settings, name)


def _worker(settings: Settings, name: str) -> str | None:
    """This host's worker beat within the heartbeat's time to live."""
    import redis

    from rotator.heartbeat import TTL_S, last_beat
    from rotator.state import RedisState

    try:
        beaten = last_beat(RedisState.from_url(settings.state.url(), settings.state.namespace, timeout_s=TIMEOUT_S),
                           name)
    except (redis.RedisError, RotatorError) as exc:
        return f"{type(exc).__name__}: the heartbeat could not be read"
    if beaten is not None:
        return None
    return (f"no heartbeat within {TTL_S}s (is `rotator worker` running here, under this node name, "
            "and its loop taking tasks?)")
