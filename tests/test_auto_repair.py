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
from rotator.errors import TransientError
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
        self.writes = 0

    def write(self, record: Any, prepared: object = None) -> StoredState:
        self.writes += 1
        written: StoredState = self.inner.write(record, prepared)
        return written

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


def test_a_spent_budget_holds_back_only_its_own_client_ids_keys(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """Redis was wiped after a reset whose answer nobody stored, and another Client ID's budget is
    paused (a 429): the sweep replays and stores this one's secret, and says it skipped the other."""
    from rotator.budget import RateBudget
    from rotator.engine.reconcile import Stopped
    from tests.test_engine import plant

    now = emulator.now()
    for client in ("aaa", "bbb"):
        emulator.add_client(client, client.upper(), created_at=now - 400 * DAY)
    ref = KeyRef("bbb", emulator.add_key("bbb", "payouts", created_at=now - 100 * DAY).id)
    sink = registry.build("memory", {}, FP)
    engine, _ = engine_at(keyservice, state, [sink])
    record = plant(engine, state, ref, keyservice)
    keyservice.reset_key(ref.client_id, ref.key_id, engine._key_of(record))  # ran; its answer lost
    for key in state.client.scan_iter(f"{state.ns}:*"):
        state.client.delete(key)  # ... and Redis with it
    keyservice.budget = RateBudget(state.client, state.ns, clock=emulator.now)
    keyservice.budget.observe("aaa", pause_s=600, pause_why="429")
    try:
        with pytest.raises(Stopped) as stopped:
            engine.repair(fresh=False, recent_only=True)
    finally:
        keyservice.budget = None
    assert stopped.value.client_id == "aaa"
    assert [(r.key_id, r.status) for r in stopped.value.done] == [(ref.key_id, "recovered")]
    assert holds_current(sink, emulator, "bbb", ref.key_id, keyservice) and len(emulator.ledger) == 1


def test_an_unsettled_secret_is_told_on_every_sweep_with_the_time_left(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """The reset ran, its answer was lost, and the key service's replay endpoint keeps failing:
    every sweep says the secret is at risk and how long the key service keeps its answer, not
    only after a day."""
    from rotator.keyservice.emulator import Fault
    from tests.test_engine import plant

    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    ref = KeyRef("acme", key_id)
    engine, events = engine_at(keyservice, state, [registry.build("memory", {}, FP)])
    record = plant(engine, state, ref, keyservice)
    keyservice.reset_key("acme", key_id, engine._key_of(record))
    emulator.add_fault(Fault(method="GET", path="/responses/", status=503, times=-1))
    try:
        for _ in range(2):
            assert [r.status for r in engine.repair(fresh=False, recent_only=True)[1]] == ["in_doubt"]
    finally:
        emulator.clear_faults()
    told = [e for e in events.events if e.name == "rotation.secret_at_risk"]
    assert len(told) == 2 and all(0 < (e.details or {})["time_left_s"] <= DAY for e in told)
    assert len(emulator.ledger) == 1


def test_the_daily_reconcile_says_drift_it_cannot_read_as_critical_and_keeps_the_history_clean(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """A sink that cannot be read for a key rotated long ago: `drift.detected` (critical), as the
    daily reconcile always said; what the sweeps leave to a person is not written to the audit
    history, which a sweep every 15 minutes would fill."""
    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    sink = CountingSink()
    engine, _ = engine_at(keyservice, state, [sink])
    assert engine.rotate(KeyRef("acme", key_id), trigger="test").status == "succeeded"
    entries = len(state.history(limit=1000))

    def unreadable(key: ApiKey) -> StoredState | None:
        raise TransientError("sink: 503")

    sink.read_state = unreadable  # type: ignore[method-assign]
    emulator.clock_offset_s = 3 * DAY  # the reset's answer is no longer kept
    later, events = engine_at(keyservice, state, [sink], offset_s=3 * DAY)
    for _ in range(3):
        drifted, results = later.repair(fresh=False)
        assert [d.certain for d in drifted] == [False] and [r.status for r in results] == ["failed"]
    assert events.names().count("drift.detected") == 3
    assert len(state.history(limit=1000)) == entries and len(emulator.ledger) == 1


def test_a_sink_that_is_briefly_unreadable_is_no_secret_at_risk(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """A key stored everywhere, then one read fails (a Vault maintenance minute): the sweep neither
    writes the secret again nor says it is at risk, and leaves no attempt behind; the daily
    reconcile tells it as drift it could not read."""
    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    sink = CountingSink()
    engine, events = engine_at(keyservice, state, [sink])
    assert engine.rotate(KeyRef("acme", key_id), trigger="test").status == "succeeded"
    written = sink.writes

    def unreadable(key: ApiKey) -> StoredState | None:
        raise TransientError("sink: 503")

    sink.read_state = unreadable  # type: ignore[method-assign]
    events.events.clear()
    drifted, results = engine.repair(fresh=False, recent_only=True)
    assert [d.certain for d in drifted] == [False] and [r.status for r in results] == ["failed"]
    assert events.names() == [] and state.attempts() == [] and len(emulator.ledger) == 1
    assert sink.writes == written == 1
    engine.repair(fresh=False)
    assert events.names() == ["drift.detected"]


def test_the_sweeps_do_not_fill_the_audit_history(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """An attempt that stays unsettled sweep after sweep is told by its events every time, and
    written to the history once a day, not once a sweep (the history keeps the last 1,000)."""
    from rotator.keyservice.emulator import Fault
    from tests.test_engine import plant

    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    engine, events = engine_at(keyservice, state, [registry.build("memory", {}, FP)])
    record = plant(engine, state, KeyRef("acme", key_id), keyservice)
    keyservice.reset_key("acme", key_id, engine._key_of(record))
    emulator.add_fault(Fault(method="GET", path="/responses/", status=503, times=-1))
    before = len(state.history(limit=1000))
    try:
        for _ in range(4):
            engine.recover_all()
            engine.repair(fresh=False, recent_only=True)
    finally:
        emulator.clear_faults()
    assert len(state.history(limit=1000)) == before + 1  # once a day, not once a sweep
    assert events.names().count("rotation.secret_at_risk") == 8


def unreadable(key: ApiKey) -> StoredState | None:
    raise TransientError("sink: 503")


def test_a_later_reset_whose_record_was_lost_is_told_at_risk_though_its_sink_cannot_be_read(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """Stored everywhere at one generation; ten minutes later rotator's next reset runs and its
    record is lost (a failover), and the sink cannot be read: the slot names the earlier
    generation, so the sweep replays the new one and says it is at risk."""
    from tests.test_engine import plant

    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    ref = KeyRef("acme", key_id)
    sink = CountingSink()
    engine, events = engine_at(keyservice, state, [sink])
    assert engine.rotate(ref, trigger="test").status == "succeeded"
    emulator.clock_offset_s = 600
    record = plant(engine, state, ref, keyservice)
    keyservice.reset_key("acme", key_id, engine._key_of(record))
    state.client.delete(f"{state.ns}:attempt:{ref}")
    state.client.srem(f"{state.ns}:attempts", str(ref))
    sink.read_state = unreadable  # type: ignore[method-assign]
    events.events.clear()
    engine.repair(fresh=False, recent_only=True)
    [told] = [e for e in events.events if e.name == "rotation.secret_at_risk"]
    assert told.key_id == key_id and 0 < (told.details or {})["time_left_s"] <= DAY + 700  # its clock is 600 s ahead
    assert sink.writes == 2 and len(emulator.ledger) == 2  # replayed from the slot's generation, and written


def test_a_persons_repair_during_an_outage_does_not_turn_the_sweeps_false_alarms_on(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    sink = CountingSink()
    engine, events = engine_at(keyservice, state, [sink])
    assert engine.rotate(KeyRef("acme", key_id), trigger="test").status == "succeeded"
    sink.read_state = unreadable  # type: ignore[method-assign]
    assert [r.status for r in engine.repair()[1]] == ["failed"]  # `reconcile --repair`: a failed line
    events.events.clear()
    engine.repair(fresh=False, recent_only=True)
    assert events.names() == [] and state.attempts() == [] and sink.writes == 1


def test_a_sink_added_since_the_last_rotation_gets_the_secret(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """What Redis says was stored everywhere names the sinks of that day: a sink added since (its
    role may write but not read) is written by the sweep, not taken for one that holds it."""
    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    first = registry.build("memory", {}, FP)
    engine, _ = engine_at(keyservice, state, [first])
    assert engine.rotate(KeyRef("acme", key_id), trigger="test").status == "succeeded"
    added = CountingSink()
    added.inner = registry.build("memory", {"name": "added"}, FP)
    added.read_state = unreadable  # type: ignore[method-assign]
    later, _ = engine_at(keyservice, state, [first, added])
    later.repair(fresh=False, recent_only=True)
    assert added.writes == 1 and len(emulator.ledger) == 1
