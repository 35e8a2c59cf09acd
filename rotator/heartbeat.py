"""A worker's heartbeat in the state Redis, which `rotator health --worker` reads.

Celery's remote control is off (a broker client could otherwise broadcast `shutdown` to every
worker), so the probe cannot ping the worker through the broker. Instead the worker's consumer
loop writes `<namespace>:worker:<node name>` every `INTERVAL_S` with a time to live of
`TTL_S`: the key is there only while the loop that takes tasks runs. Writing it needs the
worker's own Redis credentials; reading it is all the probe does.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis
from celery import bootsteps

from rotator import logs
from rotator.config import process_settings
from rotator.state import RedisState

INTERVAL_S = 5.0
TTL_S = 20
TIMEOUT_S = 2.0  # the beat runs in the loop that takes tasks: a hung Redis must not hold it long
log = logs.get("rotator.heartbeat")


def key(state: RedisState, node: str) -> str:
    return f"{state.ns}:worker:{node}"


def beat(state: RedisState, node: str) -> None:
    state.client.set(key(state, node), str(int(time.time())), ex=TTL_S)


def last_beat(state: RedisState, node: str) -> float | None:
    """When the node last beat (Unix seconds), or None when it has not within `TTL_S`."""
    value = state.client.get(key(state, node))
    return float(value) if value is not None else None


class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of the worker's consumer: its timer runs in the loop that takes tasks, so a worker
    whose loop hangs stops beating."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None
        self.state: RedisState | None = None
        self.failing = False

    def start(self, c: Any) -> None:
        s = process_settings()
        self.state = RedisState.from_url(s.state.url(), s.state.namespace, timeout_s=TIMEOUT_S)
        self.failing = False
        self._beat(c.hostname)
        self.timer_ref = c.timer.call_repeatedly(INTERVAL_S, self._beat, (c.hostname,), priority=10)

    def _beat(self, node: str) -> None:
        """One beat; a failure is logged once until a beat succeeds again (a Redis that answers
        PING but refuses writes, full or a read-only replica, fails `health --worker` this way)."""
        assert self.state is not None
        try:
            beat(self.state, node)
        except redis.RedisError as exc:
            if not self.failing:
                log.error("worker.heartbeat_failed", node=node, error=type(exc).__name__)
            self.failing = True
        else:
            self.failing = False

    def stop(self, c: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        if self.state is not None:
            with contextlib.suppress(redis.RedisError):
                self.state.client.delete(key(self.state, c.hostname))
            self.state.client.close()
            self.state = None
