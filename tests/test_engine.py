"""The rotation engine against real Redis and the emulator over HTTP, with faults."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rotator import logs
from rotator.domain import KeyRef, Secret
from rotator.engine import Engine
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.sinks import registry
from rotator.state import RedisState
from tests.conftest import FP_KEY
from tests.vault_server import VaultTestServer

FP = Fingerprinter(FP_KEY)
DAY = 86_400


@pytest.fixture
def seeded(emulator: Emulator) -> dict[str, str]:
    now = emulator.now()
    c = emulator.add_client("acme", "Acme", created_at=now - 400 * DAY)  # auto key: 400 days, due
    auto = next(iter(c.keys))
    young = emulator.add_key("acme", "reports", created_at=now - 10 * DAY).id
    return {"due": auto, "young": young}


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> Iterator[VaultTestServer]:
    with VaultTestServer() as server:
        monkeypatch.setenv("VAULT_TOKEN", server.root_token)
        yield server


def make_engine(keyservice: HttpKeyService, state: RedisState, sinks: list[Any], **kw: Any) -> tuple[Engine, CapturePublisher]:
    events = CapturePublisher()
    engine = Engine(keyservice, sinks, state, events, FP, Policy(), **kw)
    return engine, events


def memory() -> Any:
    return registry.build("memory", {}, FP)


def vault_sink(server: VaultTestServer) -> Any:
    return registry.build("vault", {"url": server.url}, FP)


def holds_current(sink: Any, emulator: Emulator, client: str, key_id: str, keyservice: HttpKeyService) -> bool:
    state = sink.read_state(keyservice.get_key(client, key_id))
    return state is not None and state.fingerprint == FP(emulator.current_secret(client, key_id))


def test_due_key_rotated_once_and_stored_everywhere(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str], vault: VaultTestServer
) -> None:
    """A due key: one reset, every sink holds the secret the service accepts, events and history."""
    sinks = [memory(), vault_sink(vault)]
    engine, events = make_engine(keyservice, state, sinks)
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "succeeded", result.reason
    assert len(emulator.ledger) == 1
    assert all(holds_current(s, emulator, "acme", seeded["due"], keyservice) for s in sinks)
    assert events.names() == ["rotation.succeeded"]
    assert state.attempts() == []
    assert state.last_rotation(KeyRef("acme", seeded["due"]))["status"] == "succeeded"
    assert set(result.sinks.values()) == {"ok"}


def test_not_due_is_skipped_unless_forced(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A young key is skipped; --force rotates it."""
    engine, _ = make_engine(keyservice, state, [memory()])
    assert engine.rotate(KeyRef("acme", seeded["young"]), trigger="test").reason == "not due"
    assert emulator.ledger == []
    assert engine.rotate(KeyRef("acme", seeded["young"]), trigger="manual", force=True).status == "succeeded"
    assert len(emulator.ledger) == 1


def test_dropped_reset_response(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Fault 1: the reset commits, its answer is lost; one reset, the sink holds the live secret."""
    sink = memory()
    engine, _ = make_engine(keyservice, state, [sink])
    emulator.add_fault(Fault(method="POST", path="/reset$", drop="after"))
    assert engine.rotate(KeyRef("acme", seeded["due"]), trigger="test").status == "succeeded"
    assert len(emulator.ledger) == 1
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_every_reset_answers_500(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Fault 6: a clear failure, an event, nothing stored, the key unchanged, bounded tries."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    before = keyservice.get_key("acme", seeded["due"])
    fault = Fault(method="POST", path="/reset$", status=500, times=100)
    emulator.add_fault(fault)
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "failed" and "not reset" in result.reason
    assert events.names() == ["rotation.failed"]
    assert 100 - fault.times == 4  # max_attempts of the fixture's client
    assert emulator.ledger == [] and sink.read_state(before) is None
    assert keyservice.get_key("acme", seeded["due"]) == before
    assert state.attempts() == []


def test_crash_after_reset_before_store_is_recovered_by_replay(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Fault 2 (in-process form): record written, reset done, process gone; recovery replays it."""
    from rotator.domain import AttemptRecord

    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    attempt = AttemptRecord("acme", seeded["due"], "a" * 8 + "-crash-attempt-0001", "schedule", time.time())
    state.save_attempt(attempt)
    keyservice.reset_key("acme", seeded["due"], attempt.attempt_id)  # the answer dies with the process
    results = engine.recover_all()
    assert [r.status for r in results] == ["recovered"]
    assert len(emulator.ledger) == 1
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)
    assert events.names() == ["rotation.recovered"] and state.attempts() == []


def test_attempt_whose_reset_never_ran_is_cleared(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A record with no reset behind it (crash before the call) is cleared; nothing is reset."""
    from rotator.domain import AttemptRecord

    engine, _ = make_engine(keyservice, state, [memory()])
    state.save_attempt(AttemptRecord("acme", seeded["due"], "never-ran-attempt-0001", "schedule", time.time()))
    assert [r.status for r in engine.recover_all()] == ["skipped"]
    assert emulator.ledger == [] and state.attempts() == []


def test_replay_expired_resets_afresh_with_critical_event(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Past 24 h the lost secret cannot be replayed: a fresh reset and rotation.secret_at_risk."""
    from rotator.domain import AttemptRecord

    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    state.save_attempt(AttemptRecord("acme", seeded["due"], "expired-attempt-00001", "schedule", time.time() - 10))
    keyservice.reset_key("acme", seeded["due"], "expired-attempt-00001")
    emulator.clock_offset_s = 25 * 3600
    results = engine.recover_all()
    assert [r.status for r in results] == ["succeeded"]
    assert "rotation.secret_at_risk" in events.names()
    assert len(emulator.ledger) == 2
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_vault_outage_shorter_than_bound_completes(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str], vault: VaultTestServer
) -> None:
    """Fault 3: Vault answers 503 for 20 s, then recovers; with a 60 s bound the rotation completes, no at-risk."""
    sink = vault_sink(vault)
    engine, events = make_engine(keyservice, state, [sink], sink_retry_s=60)
    vault.state.sealed = True
    threading.Timer(20.0, lambda: setattr(vault.state, "sealed", False)).start()
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "succeeded", result.reason
    assert result.timings["secret_window_s"] >= 20
    assert sum(1 for method, path in vault.state.requests if method == "GET") > 3  # it kept retrying
    assert "rotation.secret_at_risk" not in events.names()
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_vault_outage_longer_than_bound_is_at_risk_then_recovered(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str], vault: VaultTestServer
) -> None:
    """A bound shorter than the outage raises secret_at_risk, keeps the attempt; recovery stores it later."""
    sink = vault_sink(vault)
    engine, events = make_engine(keyservice, state, [sink], sink_retry_s=1)
    vault.state.sealed = True
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "at_risk"
    assert events.names() == ["rotation.secret_at_risk"]
    assert len(state.attempts()) == 1
    vault.state.sealed = False
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_many_triggers_at_once_rotate_once(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Fault 4 (threads): several triggers for the same key together give one reset."""
    sink = memory()
    engine, _ = make_engine(keyservice, state, [sink])
    emulator.latency_s = 0.05
    triggered = time.time()
    results: list[str] = []
    threads = [threading.Thread(target=lambda t=t: results.append(
        engine.rotate(KeyRef("acme", seeded["due"]), trigger=t, triggered_at=triggered).status))
        for t in ("beat-1", "beat-2", "manual", "beat-1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("succeeded") == 1
    assert len(emulator.ledger) == 1
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_redelivered_trigger_is_skipped(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Fault 5 (in-process): the same trigger delivered twice rotates once."""
    engine, _ = make_engine(keyservice, state, [memory()])
    emulator.clock_offset_s = -5  # the key service's reset stamps are not ahead of the trigger
    triggered = time.time() - 10
    first = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule", triggered_at=triggered)
    second = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule", triggered_at=triggered)
    assert (first.status, second.status) == ("succeeded", "skipped")
    assert len(emulator.ledger) == 1


def test_drift_detected_when_key_reset_outside(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A key reset behind rotator's back leaves sinks with a dead secret: drift.detected."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert engine.drift() == []
    emulator.clock_offset_s = 5
    keyservice.reset_key("acme", seeded["due"], "outside-reset-000001")
    drift = engine.drift()
    assert [d.key.key_id for d in drift] == [seeded["due"]]
    assert "drift.detected" in events.names()


def test_secret_canary_in_process(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str],
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """Fault 7 (in-process): at DEBUG, the new secret is in no log, Redis value, event or result."""
    logs.configure("DEBUG", json_lines=True)
    caplog.set_level(logging.DEBUG)
    engine, events = make_engine(keyservice, state, [memory()])
    emulator.add_fault(Fault(method="POST", path="/reset$", drop="after"))
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    secret = emulator.current_secret("acme", seeded["due"])
    redis_dump = [(k, state.client.dump(k)) for k in state.client.scan_iter("*")]
    out, err = capfd.readouterr()
    blob = "\n".join([caplog.text, out, err, json.dumps(result.to_dict()), repr(redis_dump),
                      json.dumps([e.to_dict() for e in events.events])])
    assert result.status == "succeeded" and len(redis_dump) > 0
    assert secret not in blob
    assert repr(Secret(secret)) == "Secret('**********')"
    logs.configure("WARNING")


def test_key_becomes_due_after_two_simulated_days(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState
) -> None:
    """A key created 89 days ago is not due today and is due two days later (only the decision is frozen)."""
    from freezegun import freeze_time

    from rotator.scan import scan

    start = time.time()
    emulator.add_client("acme", created_at=int(start - 89 * DAY))
    engine, _ = make_engine(keyservice, state, [memory()])
    with freeze_time(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start))):
        today = time.time()
    with freeze_time(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start + 2 * DAY))):
        later = time.time()
    assert [r.state.value for r in scan(keyservice, engine.policy, today)] == ["due_soon"]
    assert [r.state.value for r in scan(keyservice, engine.policy, later)] == ["due"]
    assert list(engine.due_keys(today)) == []
    assert [k.alias for k in engine.due_keys(later)] == ["Auto-generated key"]


def test_reset_that_commits_after_the_time_out_is_not_lost(
    emulator: Emulator, emulator_server: Any, state: RedisState, seeded: dict[str, str]
) -> None:
    """The reset times out, replay finds nothing yet, then the key service commits: recovery stores it."""
    sink = memory()
    slow = HttpKeyService(emulator_server.url, emulator.token, timeout_s=0.3, max_attempts=1)
    engine, events = make_engine(slow, state, [sink])
    emulator.add_fault(Fault(method="POST", path="/reset$", delay_s=1.0))
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "failed" and "will check again" in result.reason
    assert len(state.attempts()) == 1  # kept: the request may still run
    deadline = time.monotonic() + 5
    while not emulator.ledger and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(emulator.ledger) == 1  # the late commit happened
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert holds_current(sink, emulator, "acme", seeded["due"], slow)
    assert events.names() == ["rotation.failed", "rotation.recovered"]
    assert state.attempts() == []


def test_reset_refused_by_a_5xx_clears_the_record_once_replay_says_so(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """An answered 5xx plus an empty replay is conclusive: no record is kept."""
    from rotator.errors import TransientError, UnansweredError

    engine, _ = make_engine(keyservice, state, [memory()])
    emulator.add_fault(Fault(method="POST", path="/reset$", status=503, times=10))
    with pytest.raises(TransientError) as info:
        keyservice.reset_key("acme", seeded["due"], "probe-0000000000000001")
    assert not isinstance(info.value, UnansweredError)
    assert engine.rotate(KeyRef("acme", seeded["due"]), trigger="test").status == "failed"
    assert state.attempts() == [] and emulator.ledger == []
