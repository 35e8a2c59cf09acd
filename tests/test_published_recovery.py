"""Every recovery path of the rotation protocol, end to end against the emulator speaking the payment
API's published wire format (a used Idempotency-Key blocked with 409, stored answers read through
the responses endpoint with string fields and a full RequestURL): the real engine, real Redis, the
adapter over real HTTP. Each path ends with one reset and the live secret in every sink."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.protocol import idempotency_key
from rotator.sinks import registry
from rotator.sinks.memory import MemorySink
from rotator.state import RedisState
from tests.test_engine import FP, holds_current, memory

DAY = 86_400


@pytest.fixture
def due(emulator: Emulator) -> KeyRef:
    """A user key of `acme`, 100 days old: due, and revocable (the overlap strategy can replace it)."""
    assert emulator.wire == "published"
    emulator.add_client("acme", created_at=emulator.now() - 400 * DAY)
    return KeyRef("acme", emulator.add_key("acme", "checkout", created_at=emulator.now() - 100 * DAY).id)


@pytest.fixture
def sinks() -> list[Any]:
    return [memory(), memory()]


def engine_for(keyservice: HttpKeyService, state: RedisState, sinks: list[Any], **kw: Any) -> tuple[
        Engine, CapturePublisher]:
    events = CapturePublisher()
    return Engine(keyservice, sinks, state, events, FP, kw.pop("policy", Policy()), **kw), events


def stored_everywhere(sinks: list[Any], emulator: Emulator, ref: KeyRef, keyservice: HttpKeyService) -> bool:
    return all(holds_current(sink, emulator, ref.client_id, ref.key_id, keyservice) for sink in sinks)


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_lost_answer_is_read_back_after_the_409(emulator: Emulator, keyservice: HttpKeyService,
                                                  state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """The reset commits and its answer is lost; the retry with the same key is blocked (409) and
    the adapter reads the stored answer: succeeded, without a second reset."""
    engine, events = engine_for(keyservice, state, sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", drop="after"))
    assert engine.rotate(due, trigger="test").status == "succeeded"
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["rotation.succeeded"] and state.attempts() == []


def test_a_gateway_504_whose_origin_commits_later_is_recovered(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """The gateway answers 504 at once and the origin commits 1 s later: in doubt (the retries meet
    the 409 of a key in use, and nothing stored yet), then recovered from the stored answer."""
    engine, events = engine_for(keyservice, state, sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=504, commit_after_s=1.0))
    result = engine.rotate(due, trigger="test")
    assert result.status == "in_doubt", result.reason
    wait_for(lambda: len(emulator.ledger) == 1)
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["rotation.in_doubt", "rotation.recovered"]


def test_a_garbled_200_is_in_doubt_then_stored_from_the_responses_endpoint(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """The reset ran and its 200 was cut: the key service broke its answer, the stored one is whole."""
    engine, events = engine_for(keyservice, state, sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", cut=True))
    result = engine.rotate(due, trigger="test")
    assert result.status == "succeeded", result.reason
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["keyservice.protocol_error", "rotation.in_doubt", "rotation.succeeded"]


def test_a_stored_refusal_fails_loudly_and_the_next_epoch_rotates(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """The origin refuses (403) and stores the refusal: rotation.failed at once (never in doubt),
    the key is burnt, and the next trigger rotates with the next epoch's key."""
    engine, events = engine_for(keyservice, state, sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=403))
    first = engine.rotate(due, trigger="test")
    assert first.status == "failed" and "refused" in first.reason and state.attempts() == []
    assert events.names() == ["rotation.failed"] and emulator.ledger == []
    assert engine.rotate(due, trigger="test").status == "succeeded"
    key = keyservice.get_key(due.client_id, due.key_id)
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert emulator.ledger[0].idempotency_key != idempotency_key(engine._ik_mac, due, key.generation, 0)


def test_a_retry_after_a_5xx_that_committed_meets_the_409_and_reads_the_answer(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """A gateway 502 while the origin commits at once: the adapter's retry is blocked (409) and
    goes on from the stored answer."""
    patient = HttpKeyService(keyservice_url(keyservice), emulator.token, max_attempts=3, retry_initial_s=0.5,
                             clock_skew_s=3 * DAY)  # its retry comes once the origin has committed
    engine, events = engine_for(patient, state, sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=502, commit_after_s=0.0))
    result = engine.rotate(due, trigger="test")
    assert result.status == "succeeded", result.reason
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["rotation.succeeded"]


def keyservice_url(keyservice: HttpKeyService) -> str:
    return str(keyservice._client.base_url)


@pytest.mark.parametrize(("status", "kind"), [(400, "correlationid_not_found"), (404, "route_not_found")])
def test_a_proxys_answer_to_a_key_read_never_reads_as_a_key_gone(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef,
        status: int, kind: str) -> None:
    """`400 correlationid_not_found` means "nothing stored" at the responses endpoint only, and a 404
    means "gone" only with the service's own Type: a proxy answering either to a key read while the
    reset is in doubt must not clear the record."""
    engine, events = engine_for(keyservice, state, sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=504, commit_after_s=0.5))
    assert engine.rotate(due, trigger="test").status == "in_doubt"
    wait_for(lambda: len(emulator.ledger) == 1)
    emulator.add_fault(Fault(method="GET", path=f"/apikeys/{due.key_id}$", status=status, kind=kind, times=-1))
    [stray] = engine.recover_all()
    assert stray.status == "in_doubt" and "cannot read the key" in stray.reason, stray.reason
    emulator.clear_faults()
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["rotation.in_doubt", "rotation.recovered"]


def test_a_key_blocked_past_a_day_raises_the_critical_event(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """An attempt in doubt for two days whose key the service still blocks (a call with it runs and
    nothing is stored): sending the same key again meets the 409 each time, and the attempt's first
    doubt, kept across the sends, raises rotation.secret_at_risk. Once the call ends, it is stored."""
    from rotator.domain import AttemptRecord

    engine, events = engine_for(keyservice, state, sinks)
    key = keyservice.get_key(due.client_id, due.key_id)
    ik = idempotency_key(engine._ik_mac, due, key.generation, 0)
    long_ago = state.now() - 2 * DAY
    lease = state.acquire(f"key:{due}", 5)
    state.save_attempt(AttemptRecord(due.client_id, due.key_id, "two-days-ago", str(key.generation), 0,
                                     "schedule", long_ago, "in_doubt", long_ago, derived_with=engine._ik_id), lease)
    lease.release()
    emulator.add_fault(Fault(method="POST", path="/reset$", delay_s=1.5))  # a call with the key runs meanwhile
    running = threading.Thread(target=lambda: keyservice.reset_key(due.client_id, due.key_id, ik))
    running.start()
    time.sleep(0.3)
    [blocked] = engine.recover_all()
    assert blocked.status == "in_doubt" and "idempotent_creation_conflict" in blocked.reason, blocked.reason
    assert "rotation.secret_at_risk" in events.names()
    [record] = state.attempts()
    assert record.doubt_since == long_ago and record.since > long_ago
    running.join(10)
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)


def test_two_actors_with_one_key_reset_once(emulator: Emulator, keyservice: HttpKeyService, redis_server: str,
                                            sinks: list[Any], due: KeyRef) -> None:
    """Two workers that do not share Redis (one lost it) rotate the same generation at once: the
    slow origin runs the first call, the second is blocked with 409 and is in doubt until the
    stored answer settles it. One reset; both end with the live secret stored."""
    states = [RedisState.from_url(redis_server + "/0", namespace=f"t-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    first, _ = engine_for(keyservice, states[0], sinks)
    second, events = engine_for(keyservice, states[1], sinks)
    emulator.add_fault(Fault(method="POST", path="/reset$", delay_s=1.0))
    results: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: results.update(a=first.rotate(due, trigger="schedule")))
    worker.start()
    time.sleep(0.3)  # the first call is in the origin's hands
    blocked = second.rotate(due, trigger="schedule")
    worker.join(10)
    assert results["a"].status == "succeeded" and blocked.status == "in_doubt", blocked.reason
    assert "idempotent_creation_conflict" in blocked.reason
    assert [r.status for r in second.recover_all()] == ["recovered"]
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["rotation.in_doubt", "rotation.recovered"]
    for store in states:
        assert store.attempts() == []
        for key in store.client.scan_iter(f"{store.ns}:*"):
            store.client.delete(key)


def test_redis_lost_after_an_unstored_reset_is_repaired_by_replay(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """The reset ran and the process died before any sink write; Redis then lost everything:
    `reconcile --repair` recomputes the key, reads the stored answer and stores it, no second reset."""
    engine, events = engine_for(keyservice, state, sinks)
    key = keyservice.get_key(due.client_id, due.key_id)
    keyservice.reset_key(due.client_id, due.key_id, idempotency_key(engine._ik_mac, due, key.generation, 0))
    drift, results = engine.repair()
    assert {d.reason for d in drift} == {"no secret stored"} and len(drift) == len(sinks)
    assert [r.status for r in results] == ["recovered"], [r.reason for r in results]
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)
    assert events.names() == ["drift.detected", "drift.detected", "rotation.recovered"]


def test_a_stored_origin_5xx_spends_the_key_and_the_next_epoch_rotates(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """The origin failed the call and stored its 500: the key is blocked for 24 h, so once the
    horizon has passed with the generation unchanged, the next epoch's key is sent: one reset."""
    engine, events = engine_for(keyservice, state, sinks, horizon_s=0.3)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=500, stored=True))
    assert engine.rotate(due, trigger="test").status == "in_doubt"
    [record] = state.attempts()
    time.sleep(0.4)
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    [reset] = emulator.ledger
    assert reset.idempotency_key != engine._key_of(record) and state.epoch_and_now(due, record.generation)[0] == 1
    assert stored_everywhere(sinks, emulator, due, keyservice) and state.attempts() == []
    assert "rotation.secret_at_risk" not in events.names()
    # Then Redis and every sink lose it all: the repair reads past the spent epoch to the next one.
    for key in state.client.scan_iter(f"{state.ns}:*"):
        state.client.delete(key)
    MemorySink.reset_all()
    emptied = [memory(), memory()]
    assert emptied[0].read_state(keyservice.get_key(due.client_id, due.key_id)) is None
    repairer, _ = engine_for(keyservice, state, emptied)
    drift, results = repairer.repair()
    assert drift and [r.status for r in results] == ["recovered"], [r.reason for r in results]
    assert len(emulator.ledger) == 1 and stored_everywhere(emptied, emulator, due, keyservice)


def test_nothing_stored_past_the_horizon_sends_the_same_key_again(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """Gateways refused every try (nothing reached the origin): past the horizon the same key goes
    again, and, unused, it runs: one reset under the generation's first key."""
    engine, _ = engine_for(keyservice, state, sinks, horizon_s=0.3)
    emulator.add_fault(Fault(method="POST", path="/reset$", status=503, times=4))
    assert engine.rotate(due, trigger="test").status == "in_doubt"
    [record] = state.attempts()
    time.sleep(0.4)
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert [r.idempotency_key for r in emulator.ledger] == [engine._key_of(record)]
    assert stored_everywhere(sinks, emulator, due, keyservice)


def test_the_overlap_create_whose_answer_was_lost_is_read_back(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, due: KeyRef) -> None:
    """The successor's create commits and its answer is lost: the retry is blocked (409) and the
    stored create is the answer. One successor, its secret in every sink."""
    sinks = [registry.build("memory", {"path": "rotator/{client_id}/{alias}"}, FP) for _ in range(2)]
    engine, _ = engine_for(keyservice, state, sinks, policy=Policy(strategy="overlap", overlap_grace_s=3600))
    emulator.add_fault(Fault(method="POST", path="/apikeys$", drop="after"))
    result = engine.rotate(due, trigger="test")
    assert result.status == "succeeded", result.reason
    [successor] = [k for k in keyservice.list_keys("acme") if k.replaces == due.key_id]
    for sink in sinks:
        stored = sink.read_state(successor)
        assert stored is not None and stored.key_id == successor.key_id
        assert stored.fingerprint == FP(emulator.current_secret("acme", successor.key_id))


@pytest.fixture(autouse=True)
def _published(emulator: Emulator) -> Iterator[None]:
    emulator.wire = "published"
    yield


def refuse_eight_times(engine: Engine, emulator: Emulator, due: KeyRef) -> None:
    emulator.add_fault(Fault(method="POST", path="/reset$", status=403, times=8))
    for _ in range(8):
        assert engine.rotate(due, trigger="test").status == "failed"
    assert emulator.ledger == []


def test_eight_stored_refusals_do_not_block_the_key(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, sinks: list[Any], due: KeyRef) -> None:
    """Each stored refusal uses up a key; the ninth trigger rotates with the ninth."""
    engine, _ = engine_for(keyservice, state, sinks)
    refuse_eight_times(engine, emulator, due)
    assert engine.rotate(due, trigger="test").status == "succeeded"
    assert len(emulator.ledger) == 1 and stored_everywhere(sinks, emulator, due, keyservice)


def test_a_reset_past_eight_refused_epochs_is_repaired_without_redis(
        emulator: Emulator, keyservice: HttpKeyService, state: RedisState, due: KeyRef) -> None:
    """Eight stored refusals, then the ninth key's reset runs and its worker dies before any sink
    write, and Redis loses everything: the repair reads past every refused key to the one in use."""
    engine, _ = engine_for(keyservice, state, [memory()])
    refuse_eight_times(engine, emulator, due)
    key = keyservice.get_key(due.client_id, due.key_id)
    keyservice.reset_key(due.client_id, due.key_id, idempotency_key(engine._ik_mac, due, key.generation, 8))
    for entry in state.client.scan_iter(f"{state.ns}:*"):
        state.client.delete(entry)
    MemorySink.reset_all()
    emptied = [memory()]
    _, results = engine_for(keyservice, state, emptied)[0].repair()
    assert [r.status for r in results] == ["recovered"], [r.reason for r in results]
    assert len(emulator.ledger) == 1 and stored_everywhere(emptied, emulator, due, keyservice)
