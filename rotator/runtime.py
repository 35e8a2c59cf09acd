"""Wire settings into a ready engine: one place, used by the CLI and the Celery tasks."""

from __future__ import annotations

import getpass
import os

from rotator.config import Settings
from rotator.engine import Engine
from rotator.engine_factory import build_fingerprinter, build_sinks
from rotator.events import LogPublisher
from rotator.keyservice import build_keyservice
from rotator.protocols import EventPublisher
from rotator.state import RedisState


def build_state(settings: Settings) -> RedisState:
    return RedisState.from_url(str(settings.state.redis_url), settings.state.namespace, settings.state.history_max)


def build_engine(settings: Settings, publisher: EventPublisher | None = None, actor: str | None = None) -> Engine:
    fingerprint = build_fingerprinter(settings)
    engine = Engine(
        build_keyservice(settings.keyservice), build_sinks(settings, fingerprint), build_state(settings),
        publisher or LogPublisher(), fingerprint, settings.policy.to_policy(),
        sink_retry_s=settings.engine.sink_retry_s, verify=settings.engine.verify,
        lock_ttl_s=settings.state.lock_ttl_s, actor=actor or _whoami(), clients=settings.keyservice.clients,
    )
    return engine


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
