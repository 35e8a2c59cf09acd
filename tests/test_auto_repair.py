"""Beat's automatic repair against real Redis and the emulator over HTTP: it replays and stores,
never resets afresh, reads only what it must, and an at-risk secret's alert counts down."""

from __future__ import annotations

import time
from typing import Any

import pytest

from rotator.alerts.dispatch import Route, first_time
from rotator.config import AlertConfig, ConfigError, settings_from_mapping
from rotator.domain import ApiKey, KeyRef
from rotator.engine import Engine
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.protocols import Event, StoredState
from rotator.sinks import registry
from rotator.state import RedisState
from tests.test_engine import FP, holds_current

DAY = 86_400


class CountingSink:
    """A memory sink that counts the reads of its state (what a sweep costs the stores)."""

    def __init__(self) -> None:
        self.inner: Any = registry.build("memory", {}, FP)
        self.reads: list[str] = []

    def read_state(self, key: ApiKey) -> StoredState | None:
        self.reads.append(key.key_id)
        result: StoredState | None = self.inner.read_state(key)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def engine_at(keyservice: HttpKeyService, state: RedisState, sinks: list[Any], offset_s: float = 0.0
              ) -> tuple[Engine, CapturePublisher]:
    events = CapturePublisher()
    return Engine(keyservice, sinks, state, events, FP, Policy(), clock=lambda: time.time() + offset_s), events


def test_the_automatic_repair_never_resets_a_key_reset_outside_rotator(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """A person reset the key in the dashboard (their new secret may be on its way to the
    consumers): beat's repair tells the drift and sends nothing; `reconcile --repair`, a person's
    command, is what resets it afresh."""
    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    sink = registry.build("memory", {}, FP)
    engine, events = engine_at(keyservice, state, [sink])
    assert engine.rotate(KeyRef("acme", key_id), trigger="test").status == "succeeded"
    emulator.clock_offset_s = 5
    keyservice.reset_key("acme", key_id, "outside-reset-000001")
    events.events.clear()

    drifted, results = engine.repair(fresh=False, recent_only=True)
    assert [d.key.key_id for d in drifted] == [key_id]
    assert [(r.status, r.trigger) for r in results] == [("failed", "repair")]
    assert "reconcile --repair" in results[0].reason
    assert len(emulator.ledger) == 2  # rotator's reset and the person's: nothing more
    assert "drift.detected" in events.names() and "rotation.secret_at_risk" not in events.names()

    _, manual = engine.repair()
    assert [r.status for r in manual] == ["succeeded"] and len(emulator.ledger) == 3
    assert holds_current(sink, emulator, "acme", key_id, keyservice)


def test_the_frequent_sweep_reads_only_the_sinks_of_recently_reset_keys(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """The 15-minute sweep reads the sinks of keys reset within the replay lookback only; the
    daily reconcile compares every key, and finds the drift of an older one."""
    client = emulator.add_client("acme", created_at=emulator.now() - 400 * DAY)
    rotated = next(iter(client.keys))
    untouched = emulator.add_key("acme", "reports", created_at=emulator.now() - 400 * DAY).id
    sink = CountingSink()
    engine, _ = engine_at(keyservice, state, [sink])
    assert engine.rotate(KeyRef("acme", rotated), trigger="test").status == "succeeded"
    sink.reads.clear()
    assert engine.repair(fresh=False, recent_only=True) == ([], [])
    assert sink.reads == [rotated]

    emulator.clock_offset_s = 5
    keyservice.reset_key("acme", rotated, "outside-reset-000002")  # the sink now holds a dead secret
    later, events = engine_at(keyservice, state, [sink], offset_s=3 * DAY)  # past the lookback
    sink.reads.clear()
    assert later.repair(fresh=False, recent_only=True) == ([], [])
    assert sink.reads == []
    drifted, results = later.repair(fresh=False)
    assert set(sink.reads) == {rotated, untouched}
    assert [d.key.key_id for d in drifted] == [rotated] and [r.status for r in results] == ["failed"]
    assert "drift.detected" in events.names() and len(emulator.ledger) == 2


def test_an_at_risk_alert_repeats_as_the_replay_horizon_comes_closer(state: RedisState) -> None:
    """A channel's de-duplication window (a day by default) would say an at-risk secret once: the
    alert is repeated each time the time left passes a stage (12, 6, 3, 1 h, none)."""
    route = Route(0, AlertConfig(url="json://127.0.0.1:9/hook"))

    def at_risk(left_s: float | None) -> Event:
        details = {"time_left_s": left_s} if left_s is not None else None
        return Event("rotation.secret_at_risk", "critical", "acme", "k1", attempt_id="a1", details=details)

    sent = [first_time(route, at_risk(left), state) for left in
            (80_000, 70_000, 40_000, 30_000, 20_000, 10_000, 7_000, 3_000, 100, 0, 0)]
    assert sent == [True, False, True, False, True, True, False, True, False, True, False]
    assert [first_time(route, at_risk(None), state) for _ in range(2)] == [True, False]


def test_a_repair_interval_longer_than_a_quarter_of_the_replay_window_is_refused() -> None:
    base: dict[str, Any] = {"keyservice": {"kind": "emulator"}, "sinks": [{"kind": "memory"}]}
    env = {"ROTATOR_FINGERPRINT_KEY": "f" * 32}
    assert settings_from_mapping({**base, "celery": {"repair_every_s": 21_600}}, environ=env).celery.repair_every_s
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({**base, "celery": {"repair_every_s": 43_200}}, environ=env)
    assert [p.key for p in info.value.problems] == ["celery.repair_every_s"]
