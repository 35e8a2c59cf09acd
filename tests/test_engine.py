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
from rotator.domain import KeyRef, Replay, Secret
from rotator.engine import Engine
from rotator.errors import RefusedError, TransientError
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.sinks import registry
from rotator.state import RedisState
from tests.conftest import FP_KEY, redis_text
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


def test_every_reset_answers_500_is_in_doubt_until_the_horizon_then_sent_again_with_the_same_key(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A 5xx proves nothing: the record stays in doubt, nothing resets the key meanwhile; after the
    horizon with the generation unchanged, the same Idempotency-Key is sent again: one reset."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.5)
    before = keyservice.get_key("acme", seeded["due"])
    fault = Fault(method="POST", path="/reset$", status=500, times=100)
    emulator.add_fault(fault)
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "in_doubt" and not result.ok, result.reason
    assert 100 - fault.times == 4  # max_attempts of the fixture's client, all with one key
    assert emulator.ledger == [] and sink.read_state(before) is None
    [record] = state.attempts()
    assert record.phase == "in_doubt"
    assert engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule").status == "in_doubt"
    assert 100 - fault.times == 4  # a second trigger inside the horizon sends nothing
    emulator.clear_faults()
    time.sleep(0.6)
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert [e.idempotency_key for e in emulator.ledger] == [engine._key_of(record)]
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)
    assert state.attempts() == [] and "rotation.secret_at_risk" not in events.names()


def plant(engine: Engine, state: RedisState, ref: KeyRef, keyservice: HttpKeyService, *, trigger: str = "schedule",
          since: float | None = None) -> Any:
    """The record a worker writes before its reset (as if it then died), with the engine's own key."""
    from rotator.domain import AttemptRecord
    from rotator.protocol import idempotency_key

    key = keyservice.get_key(ref.client_id, ref.key_id)
    now = state.now() if since is None else since
    record = AttemptRecord(ref.client_id, ref.key_id, "crashed-worker-attempt", str(key.generation), 0, trigger,
                           now, "resetting", now, derived_with=engine._ik_id)
    assert engine._key_of(record) == idempotency_key(engine._ik_mac, ref, key.generation, 0)
    lease = state.acquire(f"key:{ref}", 5)
    state.save_attempt(record, lease)
    lease.release()
    return record


def lose_the_answer(engine: Engine, state: RedisState, ref: KeyRef, keyservice: HttpKeyService,
                    emulator: Emulator) -> None:
    """A reset that ran under a worker's record, whose answer nobody read and whose stored answer has
    since expired (25 h): the key's live secret is in no sink and cannot be replayed."""
    record = plant(engine, state, ref, keyservice)
    keyservice.reset_key(ref.client_id, ref.key_id, engine._key_of(record))
    emulator.clock_offset_s = 25 * 3600


def test_a_record_an_older_version_wrote_is_settled_with_the_key_it_holds(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Upgrade: a record as versions before this one wrote it holds the Idempotency-Key itself. The
    reset under it ran and its answer was lost with the worker; the upgraded worker settles it with
    that very key (one reset, the secret stored) and nothing of the key is left in Redis."""
    from rotator.state import _SAVE_FENCED

    sink = memory()
    engine, _ = make_engine(keyservice, state, [sink])
    ref = KeyRef("acme", seeded["due"])
    key = keyservice.get_key(ref.client_id, ref.key_id)
    ik = "r2-" + "5" * 32  # whatever the older version derived: it is used as stored
    now = state.now()
    older = {"client_id": ref.client_id, "key_id": ref.key_id, "attempt_id": "older-worker", "idempotency_key": ik,
             "generation": str(key.generation), "epoch": 0, "trigger": "schedule", "started_at": now,
             "phase": "resetting", "since": now, "issued_generation": None, "fingerprint": None, "action": "reset",
             "issued_key_id": None, "replaces": None, "doubt_since": 0.0}
    lease = state.acquire(f"key:{ref}", 5)
    assert state.client.eval(_SAVE_FENCED, 3, lease.name, state._k("attempt", str(ref)), state._k("attempts"),
                             lease.token, str(ref), json.dumps(older))
    lease.release()
    keyservice.reset_key(ref.client_id, ref.key_id, ik)  # the answer died with the older worker
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert [e.idempotency_key for e in emulator.ledger] == [ik]
    assert holds_current(sink, emulator, ref.client_id, ref.key_id, keyservice)
    assert state.attempts() == [] and ik not in redis_text(state.client)


def test_a_record_this_version_writes_is_left_in_doubt_by_an_older_one(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """During a rolling upgrade an older worker reads this version's record: its `idempotency_key`
    is empty (without the field it would read the record as the first protocol's and might reset
    afresh), and the adapter neither sends nor replays an empty key (the same check as the previous
    release's adapter, so its judge keeps the attempt in doubt for an upgraded worker); the new
    fields say how to derive the key again."""
    engine, _ = make_engine(keyservice, state, [memory()])
    record = plant(engine, state, KeyRef("acme", seeded["due"]), keyservice)
    stored = json.loads(state.client.get(state._k("attempt", str(record.ref))))
    assert stored["idempotency_key"] == "" and stored["derived_with"] == engine._ik_id
    assert stored["generation"] == record.generation and stored["epoch"] == 0
    assert keyservice.replay("acme", seeded["due"], "").kind is Replay.UNKNOWN
    with pytest.raises(RefusedError, match="nothing was sent"):
        keyservice.reset_key("acme", seeded["due"], "")
    assert emulator.idempotency_keys() == [] and emulator.ledger == []


def test_a_record_derived_with_another_secret_waits_for_it(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """The workers' Idempotency-Key secret changed while an attempt was in flight: that record is
    never sent under the new secret's key (a second reset of the generation); it waits, saying why,
    and settles once the earlier secret is back."""
    sink = memory()
    before, _ = make_engine(keyservice, state, [sink])
    record = plant(before, state, KeyRef("acme", seeded["due"]), keyservice)
    keyservice.reset_key("acme", seeded["due"], before._key_of(record))  # ran; the answer was lost
    after, _ = make_engine(keyservice, state, [sink], idempotency_secret=b"another-secret-of-the-workers")
    [waiting] = after.recover_all()
    assert waiting.status == "in_doubt" and "derived with another secret" in waiting.reason, waiting.reason
    assert len(emulator.ledger) == 1 and len(state.attempts()) == 1
    assert [r.status for r in before.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1 and holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_crash_after_reset_before_store_is_recovered_by_replay(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Record written, reset done, process gone; recovery replays it: one reset, the secret stored."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink])
    record = plant(engine, state, KeyRef("acme", seeded["due"]), keyservice)
    keyservice.reset_key("acme", seeded["due"], engine._key_of(record))  # the answer dies with the process
    results = engine.recover_all()
    assert [r.status for r in results] == ["recovered"]
    assert len(emulator.ledger) == 1
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)
    assert events.names() == ["rotation.recovered"] and state.attempts() == []


def test_attempt_whose_reset_never_ran_is_sent_again_with_the_same_key_after_the_horizon(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A record with no reset behind it (a crash before the call, here of a forced rotation of a
    young key) is in doubt until the horizon has passed since it was found; then the same
    Idempotency-Key is sent again at once (the record is never dropped on that verdict), so a
    commit later than the horizon would collapse onto it: one reset."""
    sink = memory()
    engine, _ = make_engine(keyservice, state, [sink], horizon_s=0.3)
    record = plant(engine, state, KeyRef("acme", seeded["young"]), keyservice, trigger="manual")
    assert [r.status for r in engine.recover_all()] == ["in_doubt"]
    time.sleep(0.4)
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert [e.idempotency_key for e in emulator.ledger] == [engine._key_of(record)]
    assert holds_current(sink, emulator, "acme", seeded["young"], keyservice) and state.attempts() == []


def test_replay_expired_resets_afresh_with_critical_event(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """Past 24 h the lost secret cannot be replayed: a fresh reset and rotation.secret_at_risk."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.0)
    record = plant(engine, state, KeyRef("acme", seeded["due"]), keyservice)
    keyservice.reset_key("acme", seeded["due"], engine._key_of(record))
    emulator.clock_offset_s = 25 * 3600
    results = engine.recover_all()
    assert [r.status for r in results] == ["succeeded"]
    assert "rotation.secret_at_risk" in events.names()
    assert len(emulator.ledger) == 2
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


@pytest.mark.parametrize("heard", [True, False], ids=["refusal-answered", "refusal-found-by-replay"])
def test_a_refused_fresh_reset_after_a_lost_secret_keeps_the_loss_on_record(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str], heard: bool
) -> None:
    """The reset ran, its answer expired unread, and the fresh reset that replaces the lost secret is
    refused (a stored 403, answered, or found by the replay after its answer was lost): the live
    secret is still in no sink, so "not run" must not end the attempt. The record stays (the next
    epoch's key) and the next sweep resets afresh; before, the record was deleted, no sweep or
    repair ever came back to the key, and its live secret stayed unstored (simulation seed 11281)."""
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.0)
    ref = KeyRef("acme", seeded["due"])
    lose_the_answer(engine, state, ref, keyservice, emulator)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=403, stored=True))
    if not heard:  # the refusal is stored, its answer lost on the way: the call is in doubt
        reset = keyservice.reset_key

        def unheard(*args: Any) -> Any:
            try:
                return reset(*args)
            except RefusedError:
                raise TransientError("no answer (the connection dropped)") from None

        keyservice.reset_key = unheard  # type: ignore[method-assign]
    [refused] = engine.recover_all()
    keyservice.__dict__.pop("reset_key", None)
    assert refused.status in ("at_risk", "in_doubt") and not refused.ok, refused.reason
    kept = state.get_attempt(ref)
    assert kept is not None and kept.after_loss, "the loss is no longer on record"
    assert events.names().count("rotation.secret_at_risk") >= 1
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice) and state.attempts() == []
    assert len(emulator.ledger) == 2  # the planted reset and the fresh one; the refused one never ran


def test_a_fresh_reset_after_a_lost_secret_that_uses_up_every_key_is_kept(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """The fresh reset that replaces a lost secret fails with a stored 5xx on every try, sweep after
    sweep, until the generation's Idempotency-Keys are used up: the record is kept (and said on
    every sweep), never cleared with the loss forgotten; once the key service forgets the failed
    calls, the last key runs and the secret is stored."""
    from rotator.protocol import MAX_EPOCHS

    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.0)
    ref = KeyRef("acme", seeded["due"])
    lose_the_answer(engine, state, ref, keyservice, emulator)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=500, stored=True, times=-1))
    statuses = [r.status for _ in range(MAX_EPOCHS + 3) for r in engine.recover_all()]
    kept = state.get_attempt(ref)
    assert kept is not None and kept.after_loss and kept.epoch == MAX_EPOCHS - 1, statuses[-3:]
    assert statuses[-1] == "at_risk" and "failed" not in statuses
    assert events.names().count("rotation.secret_at_risk") >= 2  # the loss, then the used-up keys
    emulator.clear_faults()
    emulator.clock_offset_s += 25 * 3600  # the failed calls are forgotten: the last key may run
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice) and state.attempts() == []


def seal_after_reset(keyservice: HttpKeyService, vault: VaultTestServer, unseal_after_s: float | None = None) -> None:
    """Vault goes down right after the key service answered the reset (after the sinks were prepared)."""
    reset = keyservice.reset_key

    def then_seal(*args: Any) -> Any:
        issued = reset(*args)
        vault.state.sealed = True
        if unseal_after_s is not None:
            threading.Timer(unseal_after_s, lambda: setattr(vault.state, "sealed", False)).start()
        return issued

    keyservice.reset_key = then_seal  # type: ignore[method-assign]


def test_a_sink_that_is_down_before_the_reset_means_no_reset(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str], vault: VaultTestServer
) -> None:
    """Sinks are prepared before the reset: a sealed Vault fails the rotation and the key keeps its secret."""
    engine, events = make_engine(keyservice, state, [memory(), vault_sink(vault)])
    vault.state.sealed = True
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "failed" and "not ready" in result.reason and "not reset" in result.reason
    assert emulator.ledger == [] and state.attempts() == []
    assert events.names() == ["rotation.failed"]


def test_vault_outage_shorter_than_bound_completes(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str], vault: VaultTestServer
) -> None:
    """Fault 3: Vault answers 503 for 20 s, then recovers; with a 60 s bound the rotation completes, no at-risk."""
    sink = vault_sink(vault)
    engine, events = make_engine(keyservice, state, [sink], sink_retry_s=60)
    seal_after_reset(keyservice, vault, unseal_after_s=20.0)
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
    seal_after_reset(keyservice, vault)
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
    seen = str(keyservice.get_key("acme", seeded["due"]).generation)
    results: list[str] = []
    threads = [threading.Thread(target=lambda t=t: results.append(
        engine.rotate(KeyRef("acme", seeded["due"]), trigger=t, generation=seen).status))
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
    emulator.clock_offset_s = -5  # the key service's clock behind this host's does not matter
    seen = str(keyservice.get_key("acme", seeded["due"]).generation)
    first = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule", generation=seen)
    second = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule", generation=seen)
    forced = engine.rotate(KeyRef("acme", seeded["due"]), trigger="manual", force=True, generation=seen)
    assert (first.status, second.status, forced.status) == ("succeeded", "skipped", "skipped")
    assert second.reason == "rotated since the trigger"
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
    """Fault 7 (in-process): at DEBUG, the new secret is in no log, Redis value, event or result; nor
    is any Idempotency-Key (it reads the secret from the stored answer), even while the replay of
    that answer fails and the attempt waits in doubt."""
    logs.configure("DEBUG", json_lines=True)
    caplog.set_level(logging.DEBUG)
    engine, events = make_engine(keyservice, state, [memory()])
    emulator.add_fault(Fault(method="POST", path="/reset$", drop="after"))
    emulator.add_fault(Fault(method="GET", path="/responses/", status=503, times=100))
    doubt = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert doubt.status == "in_doubt" and "replay of the stored answer failed: 503" in doubt.reason
    waiting = redis_text(state.client)  # the in-doubt record, as it waits
    emulator.clear_faults()
    [result] = engine.recover_all()
    secret = emulator.current_secret("acme", seeded["due"])
    redis_dump = redis_text(state.client)
    out, err = capfd.readouterr()
    blob = "\n".join([caplog.text, out, err, json.dumps(doubt.to_dict()), json.dumps(result.to_dict()), waiting,
                      redis_dump, json.dumps(state.history(50)), json.dumps([e.to_dict() for e in events.events])])
    assert result.status == "recovered" and "in_doubt" in waiting and len(redis_dump) > 0
    assert secret not in blob
    [ik] = emulator.idempotency_keys()
    assert ik not in blob and f"responses/{ik}" not in blob
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
    from rotator.places import due_with_places

    assert due_with_places(scan(keyservice, engine.policy, today), engine.sinks) == []
    assert [(k.alias, conflict) for k, conflict in due_with_places(scan(keyservice, engine.policy, later),
                                                                   engine.sinks)] == [("Auto-generated key", None)]


def test_reset_that_commits_after_the_time_out_is_not_lost(
    emulator: Emulator, emulator_server: Any, state: RedisState, seeded: dict[str, str]
) -> None:
    """The reset times out, replay finds nothing yet, then the key service commits: recovery stores it."""
    sink = memory()
    slow = HttpKeyService(emulator_server.url, emulator.token, timeout_s=0.3, max_attempts=1)
    engine, events = make_engine(slow, state, [sink])
    emulator.add_fault(Fault(method="POST", path="/reset$", delay_s=1.0))
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "in_doubt", result.reason
    assert len(state.attempts()) == 1  # kept: the request may still run
    deadline = time.monotonic() + 5
    while not emulator.ledger and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(emulator.ledger) == 1  # the late commit happened
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert holds_current(sink, emulator, "acme", seeded["due"], slow)
    assert events.names() == ["rotation.in_doubt", "rotation.recovered"]
    assert state.attempts() == []


def test_a_conclusive_refusal_advances_the_epoch(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A 4xx proves the reset did not run: the record is cleared and the next try of the same
    generation uses a new Idempotency-Key (a stored refusal would otherwise be replayed for 24 h)."""
    engine, _ = make_engine(keyservice, state, [memory()])
    emulator.add_fault(Fault(method="POST", path="/reset$", status=403))
    first = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert first.status == "failed" and "refused" in first.reason
    assert state.attempts() == [] and emulator.ledger == []
    assert engine.rotate(KeyRef("acme", seeded["due"]), trigger="test").status == "succeeded"
    key = keyservice.get_key("acme", seeded["due"])
    assert len(emulator.ledger) == 1 and emulator.ledger[0].at == key.born_at


def test_a_record_of_the_first_protocol_is_recovered_by_replay(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """An attempt record written before the upgrade (its attempt id was the Idempotency-Key) is
    settled by replaying that key: the secret is stored, nothing is reset again."""
    ref = f"acme/{seeded['due']}"
    old = {"client_id": "acme", "key_id": seeded["due"], "attempt_id": "first-protocol-attempt-01",
           "trigger": "schedule", "started_at": time.time(), "phase": "resetting", "reset_at": None}
    state.client.set(f"{state.ns}:attempt:{ref}", json.dumps(old))
    state.client.sadd(f"{state.ns}:attempts", ref)
    keyservice.reset_key("acme", seeded["due"], "first-protocol-attempt-01")
    sink = memory()
    engine, _ = make_engine(keyservice, state, [sink])
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1 and state.attempts() == []
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)


def test_a_reset_that_does_not_move_the_dates_is_not_reset_again(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A key service that resets but keeps showing the old LastResetDate: the secret is stored and
    verified, a protocol error is raised, and the next scan does not reset it again (no reset loop)."""
    from dataclasses import replace as dc_replace

    from rotator.domain import IssuedKey

    frozen = keyservice.get_key("acme", seeded["due"])

    class StaleDates:
        def __getattr__(self, name: str) -> Any:
            return getattr(keyservice, name)

        def get_key(self, client_id: str, key_id: str) -> Any:
            key = keyservice.get_key(client_id, key_id)
            return dc_replace(key, last_reset_at=frozen.last_reset_at) if key_id == frozen.key_id else key

        def reset_key(self, client_id: str, key_id: str, ik: str) -> IssuedKey:
            issued = keyservice.reset_key(client_id, key_id, ik)
            return IssuedKey(dc_replace(issued.key, last_reset_at=frozen.last_reset_at), issued.secret)

    sink = memory()
    events = CapturePublisher()
    engine = Engine(StaleDates(), [sink], state, events, FP, Policy())  # type: ignore[arg-type]
    first = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule")
    assert first.status == "succeeded" and "did not move" in first.reason
    assert events.names() == ["rotation.succeeded", "keyservice.protocol_error"]
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)
    again = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule")
    assert again.status == "skipped" and "protocol error" in again.reason
    assert len(emulator.ledger) == 1


def test_a_reset_answer_naming_another_key_is_never_stored_under_it(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str]
) -> None:
    """A 200 that names another key: nothing is stored anywhere, the attempt stays in doubt under
    the asked key with a critical protocol-error event; once settled, the key is reset once."""
    other = keyservice.get_key("acme", seeded["young"])
    body = json.dumps({"Id": other.key_id, "ClientId": "acme", "Alias": other.alias, "IsAutoGenerated": False,
                       "Environment": "PRODUCTION", "Scopes": [], "CreationDate": other.created_at,
                       "LastResetDate": other.created_at + 5, "Status": "ACTIVE", "Secret": "stolen-looking-secret"})
    emulator.add_fault(Fault(method="POST", path="/reset$", body=body))
    sink = memory()
    engine, events = make_engine(keyservice, state, [sink], horizon_s=0.3)
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="test")
    assert result.status == "in_doubt"
    assert events.names()[:2] == ["keyservice.protocol_error", "rotation.in_doubt"]
    assert events.events[0].severity == "critical"
    assert sink.read_state(other) is None
    assert sink.read_state(keyservice.get_key("acme", seeded["due"])) is None
    assert [a.key_id for a in state.attempts()] == [seeded["due"]]
    time.sleep(0.4)
    assert [r.status for r in engine.recover_all()] == ["recovered"]  # the same key sent again
    assert len(emulator.ledger) == 1 and emulator.ledger[0].key_id == seeded["due"]
    assert holds_current(sink, emulator, "acme", seeded["due"], keyservice)
    assert "stolen-looking-secret" not in json.dumps([e.to_dict() for e in events.events])


def documented_round_trips() -> dict[str, int]:
    """The rows of docs/protocol.md's table "Round trips of one rotation", counted by where each goes."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    table = text.split("### Round trips of one rotation", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[2].strip() for line in ("|" + table).splitlines()[2:] if line.startswith("|")]
    return {"redis": rows.count("Redis"), "http": rows.count("key service")}


def test_a_clean_rotation_takes_the_round_trips_the_protocol_doc_lists(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every Redis command or pipeline and every key-service call of one clean rotation, counted where
    they leave this process, is a row of the table in docs/protocol.md, and no more."""
    import redis

    engine, _ = make_engine(keyservice, state, [memory()])
    counted = {"redis": 0, "http": 0}

    def counting(kind: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counted[kind] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(state.client, "execute_command", counting("redis", state.client.execute_command))
    monkeypatch.setattr(redis.client.Pipeline, "execute",
                        counting("redis", redis.client.Pipeline.execute))
    monkeypatch.setattr(keyservice._transport, "send", counting("http", keyservice._transport.send))
    result = engine.rotate(KeyRef("acme", seeded["due"]), trigger="schedule")
    assert result.status == "succeeded", result
    assert counted == documented_round_trips() == {"redis": 7, "http": 3}


def test_a_full_redis_refuses_the_slot_and_the_deletion_together(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, seeded: dict[str, str],
) -> None:
    """The stored-rotation slot and the record's deletion go in one round trip and one transaction:
    a Redis that refuses the slot's `SET` (out of memory) deletes nothing either, so recovery still
    finds the record, as when the two were sent apart."""
    import redis

    engine, _ = make_engine(keyservice, state, [memory()])
    ref = KeyRef("acme", seeded["due"])
    record = plant(engine, state, ref, keyservice)
    lease = state.acquire(f"key:{ref}", 30)
    assert lease is not None
    state.client.config_set("maxmemory", 1)  # the default policy, noeviction: every write refused
    try:
        with pytest.raises(redis.RedisError):
            state.delete_attempt(record, lease, stored_at=state.now())
    finally:
        state.client.config_set("maxmemory", 0)
    lease.release()
    assert state.get_attempt(ref) == record and ref.key_id in str(state.client.smembers(f"{state.ns}:attempts"))
    assert state.stored_rotation(ref) is None
