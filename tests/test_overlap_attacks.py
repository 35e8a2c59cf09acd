# ruff: noqa: F811  (pytest fixtures imported from the modules that define them)
"""Attacks on the overlap strategy from an outside review, kept as regression tests: each test
stages one attack (a lying key service, a sink that comes back late, a revoke by a person, a
consumer that moved over on day one, ...) and asserts that rotator neither loses a secret nor
revokes a key consumers still need. The test's name says the attack."""

from __future__ import annotations

from typing import Any

import pytest

from rotator.config import ConfigError, settings_from_mapping
from rotator.domain import KeyRef, KeyState, LastUse, Secret, utc_iso
from rotator.engine import Engine
from rotator.errors import TransientError
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Fault
from rotator.policy import Policy, assess
from rotator.protocols import SecretRecord
from rotator.sinks import registry
from tests.test_aws_iam import DAY, _management_credentials, iam, moto, service  # noqa: F401
from tests.test_engine import FP
from tests.test_overlap import (  # noqa: F401
    GRACE,
    SCOPES,
    Clock,
    Crash,
    file_sink,
    keys,
    overlap_engine,
    successor_of,
)


def store(sink: Any, keyservice: Any, emulator: Any, key_id: str) -> None:
    """Put a key's current secret into a sink, as an earlier rotation would have."""
    key = keyservice.get_key("acme", key_id)
    secret = Secret(emulator.current_secret("acme", key_id))
    sink.write(SecretRecord(key, secret, "a2-earlier", FP(secret), float(key.born_at)), sink.prepare(key))


def record(emulator: Any, key_id: str) -> Any:
    return emulator._clients["acme"].keys[key_id]



# A: a redelivered / retried forced message (generation argument attached) revokes the old key at
# once, with no grace: the generation check does not see a create (the old key's dates never move).
def test_redelivered_forced_message_revokes_without_grace(emulator, keyservice, state, keys, file_sink) -> None:
    old = keys["payments"]
    old_secret = emulator.current_secret("acme", old)
    seen = str(keyservice.get_key("acme", old).generation)  # what `rotate --apply --enqueue --force` put in the message
    engine, events = overlap_engine(keyservice, state, [file_sink], Clock())
    first = engine.rotate(KeyRef("acme", old), trigger="manual", force=True, generation=seen)
    assert first.status == "succeeded", first.reason
    # the same message delivered again (at-least-once delivery, or a busy-retry of a duplicate)
    second = engine.rotate(KeyRef("acme", old), trigger="manual", force=True, generation=seen)
    print(second.status, second.reason, events.names())
    # should: "rotated since the trigger" / skipped, old key still valid for its grace
    assert second.status == "skipped", second.reason
    assert emulator.check_secret("acme", old_secret), "old key revoked seconds after its successor was created"



# B: the key service names an unrelated key (another alias, Replaces null) as K's ReplacedBy.
# `Engine.successor` accepts a successor whose Replaces is None and never checks the alias, so
# (B1) K is revoked while the sink place of K still holds K's secret, and
# (B2) a lost-create verdict revokes the unrelated key as an "orphan".
def test_b1_k_revoked_while_its_sink_place_holds_k(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    x = emulator.add_key("acme", "reporting", SCOPES, created_at=emulator.now() - 100 * 86400).id
    store(file_sink, keyservice, emulator, k)   # consumers of "payments" read K
    store(file_sink, keyservice, emulator, x)   # consumers of "reporting" read X
    k_secret = emulator.current_secret("acme", k)
    record(emulator, k).replaced_by = x         # the lying / buggy key service
    engine, events = overlap_engine(keyservice, state, [file_sink], Clock())
    result = engine.rotate(KeyRef("acme", k), trigger="schedule")
    print(result.status, result.reason, events.names())
    assert file_sink.read_secret(keyservice.get_key("acme", x)) is not None
    # should: refuse (X does not Replace K, other alias); K's place still holds K
    assert emulator.check_secret("acme", k_secret), "K revoked while its sink place still holds K's secret"


def test_b2_lost_create_verdict_revokes_an_unrelated_key(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    x = emulator.add_key("acme", "other-team", SCOPES, created_at=emulator.now() - 3 * 86400).id  # not rotator's
    store(file_sink, keyservice, emulator, k)
    x_secret = emulator.current_secret("acme", x)
    # the create never runs (connection dropped before), and nothing is stored for it
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", drop="before", times=-1))
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))
    engine, _events = overlap_engine(keyservice, state, [file_sink], Clock(), horizon_s=3600.0)
    first = engine.rotate(KeyRef("acme", k), trigger="test")
    print("first", first.status, first.reason)
    assert state.attempts(), "an in-doubt create record is kept"
    record(emulator, k).replaced_by = x         # the key service now lies about K's successor
    engine2, events2 = overlap_engine(keyservice, state, [file_sink], Clock(), horizon_s=0.0)
    results = engine2.recover_all()
    print([(r.status, r.reason) for r in results], events2.names())
    # should: never revoke a key that does not Replace K
    assert emulator.check_secret("acme", x_secret), "an unrelated key was revoked as an 'orphan'"



# B2b: like B2, but the foreign key appears after the in-doubt create began (another team creates a
# key meanwhile) and the key service names it as K's ReplacedBy. The working tree's `_not_made_by`
# (older than the attempt / already used) does not stop this: it is revoked as an 'orphan'.
def test_foreign_key_created_during_doubt_is_revoked(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    store(file_sink, keyservice, emulator, k)
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))
    engine, _ = overlap_engine(keyservice, state, [file_sink], Clock(), horizon_s=3600.0)
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", drop="before", times=-1))
    first = engine.rotate(KeyRef("acme", k), trigger="test")
    assert first.status == "in_doubt", first.reason
    emulator.clear_faults()
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))
    x = emulator.add_key("acme", "other-team", SCOPES).id          # created now, by someone else
    x_secret = emulator.current_secret("acme", x)
    record(emulator, k).replaced_by = x
    engine2, _ = overlap_engine(keyservice, state, [file_sink], Clock(), horizon_s=0.0)
    results = engine2.recover_all()
    print([(r.status, r.reason) for r in results])
    assert emulator.check_secret("acme", x_secret), "a foreign key (other alias, Replaces null) was revoked"



# C: the grace counts from the successor's CreationDate, not from the moment every sink holds it.
# A sink that could not take the successor for longer than the grace (at_risk, finished later by
# recovery) gets the successor and, in the same sweep, K is revoked: consumers of that sink read K
# until a moment ago and get no grace at all (outage).
def test_zero_grace_for_a_sink_stored_late(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    k_secret = emulator.current_secret("acme", k)
    late = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    late.fail_next = [TransientError("vault sealed")] * 1000
    clock = Clock()
    engine, _events = overlap_engine(keyservice, state, [file_sink, late], clock, sink_retry_s=0.0)
    first = engine.rotate(KeyRef("acme", k), trigger="schedule")
    assert first.status == "at_risk", first.reason
    late.fail_next = []
    clock.shift = GRACE + 3600                 # the sink came back after 7 days
    [recovered] = engine.recover_all()         # the sweep stores the successor in it now ...
    assert recovered.status == "recovered", recovered.reason
    retire = engine.rotate(KeyRef("acme", k), trigger="schedule")   # ... and the same scan retires K
    print(retire.status, retire.reason)
    assert emulator.check_secret("acme", k_secret), \
        "K revoked seconds after the last sink stopped handing it out: consumers of that sink got no grace"



# D: `_places_moving_with_key_id` probes with key_id + "-successor" and skips a sink on any
# RotatorError; a key id of 119..128 characters makes the probe id invalid, so a `{key_id}` place is
# not refused. With `rotate --apply --strategy overlap` (policy strategy reset, so check-config never
# looked), the successor is stored at a new path and, after the grace, K is revoked while K's path
# still holds K's secret.
def test_long_key_id_bypasses_the_key_id_place_guard(emulator, keyservice, state) -> None:
    now = emulator.now()
    emulator.add_client("acme", "Acme", created_at=now - 400 * 86400)
    k = emulator.add_key("acme", "payments", SCOPES, created_at=now - 100 * 86400, key_id="k" * 120).id
    sink = registry.build("memory", {}, FP)     # default path {client_id}/{key_id}; fine for reset
    store(sink, keyservice, emulator, k)
    k_secret = emulator.current_secret("acme", k)
    clock = Clock()
    engine = Engine(keyservice, [sink], state, CapturePublisher(), FP, Policy(), clock=clock)
    result = engine.rotate(KeyRef("acme", k), trigger="manual", strategy="overlap")   # --strategy overlap
    print(result.status, result.reason)
    # should: failed, "... names the key id ... use {alias}; nothing was created"
    if result.status == "succeeded":
        clock.shift = GRACE + 60
        retire = engine.rotate(KeyRef("acme", k), trigger="schedule")
        print("retire:", retire.status, retire.reason)
        old_place = sink.versions(KeyRef("acme", k))
        print("K's place still holds K's document:", old_place[-1]["key_id"] == k if old_place else None)
        assert emulator.check_secret("acme", k_secret), "K revoked while its own sink place still holds it"
    assert result.status == "failed" and "{alias}" in result.reason, result.reason



# E: a successor rotated (forced, or --strategy) while its predecessor is still retiring.
def test_force_successor_while_predecessor_retiring(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    clock = Clock()
    engine, events = overlap_engine(keyservice, state, [file_sink], clock)
    assert engine.rotate(KeyRef("acme", k), trigger="test").status == "succeeded"
    n = successor_of(keyservice, k).key_id
    r = engine.rotate(KeyRef("acme", n), trigger="manual", force=True)
    print("force N:", r.status, "|", r.reason, "|", events.names(), "| attempts:", [(a.key_id == n, a.phase) for a in state.attempts()])
    drift, results = engine.repair()
    print("repair:", [(d.key.key_id == n, d.reason) for d in drift], [(x.status, x.reason) for x in results])
    clock.shift = GRACE + 60
    r2 = engine.rotate(KeyRef("acme", k), trigger="schedule")
    print("retire K:", r2.status, r2.reason)
    r3 = engine.rotate(KeyRef("acme", n), trigger="schedule")
    print("N after:", r3.status, r3.reason, [(a.key_id == n, a.phase) for a in state.attempts()])
    assert state.attempts() == []



# G: the two-stage (IAM) retirement refuses to deactivate K when K's *last* use is later than the
# successor's CreationDate. A consumer that follows docs/strategies.md (re-read the sink daily, within
# the grace) necessarily uses K after N exists; K is then never deactivated, even though nobody has
# used it for 6 days. (Stub: the HTTP emulator plus IAM's deactivate_key/last_used.)
class TwoStage:
    delete_after_s = 7 * 86400.0

    def __init__(self, inner: Any, emulator: Any) -> None:
        self.inner, self.emulator, self.deactivated, self.used_at = inner, emulator, [], None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def deactivate_key(self, client_id: str, key_id: str) -> None:
        self.deactivated.append(key_id)

    def last_used(self, client_id: str, key_id: str) -> LastUse | None:
        return self.used_at


def test_consumer_that_moved_over_on_day_one_blocks_deactivation_forever(emulator, keyservice, state, keys,
                                                                          file_sink) -> None:
    k = keys["payments"]
    ks = TwoStage(keyservice, emulator)
    clock = Clock()
    engine, events = overlap_engine(ks, state, [file_sink], clock)
    assert engine.rotate(KeyRef("acme", k), trigger="schedule").status == "succeeded"
    n = successor_of(keyservice, k)
    ks.used_at = LastUse(n.created_at + 86400, "s3", "eu-west-1")   # last used on day 1: consumer re-read daily
    clock.shift = GRACE + 60
    r = engine.rotate(KeyRef("acme", k), trigger="schedule")
    print(r.status, r.reason, events.names())
    assert ks.deactivated == [k], "K unused for 6 days is refused as 'still in use'"



# H: IAM pairs any two keys of a user as predecessor/successor, whatever their status. A user
# whose old key is Active (the one in use) and whose newer key is Inactive (a spare switched off, or
# a successor a person switched off) has its Active key classified RETIRING forever: never due,
# never counted overdue, never rotated; the scan's only signal is a misleading 'not revoked'.
def test_active_key_with_a_newer_inactive_key_is_never_due(iam: dict[str, Any]) -> None:
    user = iam["user"]("batch", keys=2)
    older, newer = iam["keys"]["batch"]
    iam["client"].update_access_key(UserName=user, AccessKeyId=newer, Status="Inactive")
    ks = service(iam)
    [account] = [c.client_id for c in ks.list_clients()]
    key = ks.get_key(account, older)
    later = key.created_at + 200 * DAY                   # the Active key is 200 days old
    state = assess(key, later, Policy(max_age_days=90, strategy="overlap"))[0]
    print(key.status, key.replaced_by == newer, state)
    assert state is KeyState.DUE, f"an Active 200-day-old access key reads {state.value}"



# I (secret loss): a create whose sinks failed (at_risk) keeps its record to replay the one-time
# secret. If K is revoked meanwhile (docs/strategies.md: "revoke a leaked key at the key service
# itself"), `_settle` sees get_key(K) -> 404 and deletes the record: the successor's secret, still
# replayable at the key service, is never stored; nothing can find it again (N no longer Replaces
# K, so `_replay_creation` gives up). N is a live key nobody holds; the sinks hand out revoked K.
def test_revoking_the_replaced_key_loses_the_successors_secret(emulator, keyservice, state, keys) -> None:
    k = keys["payments"]
    k_key = keyservice.get_key("acme", k)
    sink = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    sink.fail_next = [TransientError("sink down")] * 1000
    engine, _events = overlap_engine(keyservice, state, [sink], Clock(), sink_retry_s=0.0)
    first = engine.rotate(KeyRef("acme", k), trigger="manual", force=True)   # a leaked key, rotated now
    assert first.status == "at_risk", first.reason
    n = successor_of(keyservice, k)
    n_secret = emulator.current_secret("acme", n.key_id)
    keyservice.revoke_key("acme", k)             # the operator revokes the leaked key at the key service
    sink.fail_next = []                          # the sink is back
    results = engine.recover_all()
    print([(r.status, r.reason) for r in results], [a.phase for a in state.attempts()])
    drift, repaired = engine.repair()
    print([(d.certain, d.reason[:80]) for d in drift], [(r.status, r.reason[:120]) for r in repaired])
    from rotator.protocol import idempotency_key
    ik = idempotency_key(engine._ik_mac, k_key.ref, k_key.generation, 0, "create")
    replay = keyservice.replay_create("acme", k, ik)
    print("still replayable at the key service:", replay.kind, replay.issued is not None and replay.issued.secret.reveal() == n_secret)
    stored = sink.versions(keyservice.get_key("acme", n.key_id))
    assert any(v.get("api_key") == n_secret for v in stored), \
        "successor's one-time secret never stored: record dropped on the predecessor's 404"



# K (low): check-config's {key_id} refusal is a substring test; `{key_id!s}` (or `{key_id:s}`)
# renders the key id all the same and passes. (The engine's runtime probe still refuses the create.)
@pytest.mark.parametrize("path", ["rotator/{client_id}/{alias}/{key_id!s}", "rotator/{client_id}/{alias}-{key_id:s}"])
def test_key_id_template_variants_pass_check_config(path: str) -> None:
    with pytest.raises(ConfigError, match=r"alias"):
        settings_from_mapping({"keyservice": {"url": "http://127.0.0.1:1"}, "policy": {"strategy": "overlap"},
                               "sinks": [{"kind": "memory", "path": path}]}, environ={"ROTATOR_FINGERPRINT_KEY": "x" * 32, "ROTATOR_KEYSERVICE_TOKEN": "t"})



# L: a successor stored in sink A but not in sink B (B down), where the key service stores no answer
# (AWS IAM always: replay_create is EMPTY; HTTP after 24 h). Recovery never finishes it, though sink
# A holds the secret (read_secret exists): LOST -> _drop_orphan -> "a person must decide", forever;
# K can then never be retired and nothing rotates the lineage.
def test_partial_store_without_a_replay_is_never_finished(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    b = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    b.fail_next = [TransientError("down")] * 1000
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))   # IAM: nothing stored
    clock = Clock()
    engine, _events = overlap_engine(keyservice, state, [file_sink, b], clock, sink_retry_s=0.0, horizon_s=0.0)
    first = engine.rotate(KeyRef("acme", k), trigger="schedule")
    assert first.status == "at_risk", first.reason
    b.fail_next = []
    for day in (0, 1, 8):
        clock.shift = day * 86400
        res = engine.recover_all()
        print(f"day {day}:", [(r.status, r.reason[-90:]) for r in res])
    n = successor_of(keyservice, k)
    assert b.read_state(n) is not None and b.read_state(n).key_id == n.key_id, \
        "sink B never gets the successor although sink A holds its secret"


# F1: when the replaced key is gone (a person revoked it) and the create's stored answer is in hand,
# one transient error reading the successor deletes the attempt record: the one-time secret is lost.
def test_transient_read_of_successor_drops_record_and_loses_secret(emulator, keyservice, state, keys) -> None:
    k = keys["payments"]
    sink = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    sink.fail_next = [TransientError("sink down")] * 1000
    engine, _ = overlap_engine(keyservice, state, [sink], Clock(), sink_retry_s=0.0)
    first = engine.rotate(KeyRef("acme", k), trigger="manual", force=True)
    assert first.status == "at_risk", first.reason
    n = successor_of(keyservice, k)
    n_secret = emulator.current_secret("acme", n.key_id)
    keyservice.revoke_key("acme", k)         # documented: revoke a leaked key at the key service
    sink.fail_next = []
    # one recovery pass during which GET of the successor answers 503 (a blip)
    emulator.add_fault(Fault(method="GET", path=rf"/acme/apikeys/{n.key_id}$", status=503, times=-1))
    results = engine.recover_all()
    print([(r.status, r.reason) for r in results])
    emulator.clear_faults()
    # the blip is over: later runs must still be able to store the secret
    print([(r.status, r.reason) for r in engine.recover_all()])
    drift, repaired = engine.repair()
    print([(d.certain, d.reason) for d in drift], [(r.status, r.reason) for r in repaired])
    stored = sink.versions(keyservice.get_key("acme", n.key_id))
    assert any(v.get("api_key") == n_secret for v in stored), \
        "the successor's secret was in hand; a transient error deleted the record and it is lost"


# F2: the grace's start ("successor stored" slot) shares Redis's stored-rotation slot with the
# successor's own resets: one reset of the successor during the grace overwrites it, and the replaced
# key's grace falls back to the successor's CreationDate. A sink that got the successor late loses
# the grace docs/strategies.md promises it.
DAY = 86_400


def test_reset_of_successor_erases_the_late_store_grace(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    k_secret = emulator.current_secret("acme", k)
    late = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    late.fail_next = [TransientError("vault sealed")] * 1000
    clock = Clock()
    engine, _ = overlap_engine(keyservice, state, [file_sink, late], clock, sink_retry_s=0.0)
    assert engine.rotate(KeyRef("acme", k), trigger="schedule").status == "at_risk"
    late.fail_next = []
    clock.shift = 6 * DAY                       # the sealed sink is back on day 6
    [recovered] = engine.recover_all()
    assert recovered.status == "recovered", recovered.reason
    n = successor_of(keyservice, k)
    print("retire_at before:", (engine.retire_at(keyservice.get_key("acme", k), n) - clock()) / DAY, "days from now")
    # day 6: a person force-rotates the successor (say it leaked); under overlap it is reset
    forced = engine.rotate(KeyRef("acme", n.key_id), trigger="manual", force=True)
    print("forced N:", forced.status, forced.reason)
    n = keyservice.get_key("acme", n.key_id)
    print("retire_at after:", (engine.retire_at(keyservice.get_key("acme", k), n) - clock()) / DAY, "days from now")
    clock.shift = GRACE + 3600                  # day 7: one day after the late sink first served N
    retire = engine.rotate(KeyRef("acme", k), trigger="schedule")
    print("retire K:", retire.status, retire.reason)
    assert emulator.check_secret("acme", k_secret), \
        "K revoked 1 day after the late sink stopped serving it; the grace promised 7"


# F3: a partial store of a successor (sink A holds it, sink B was down) where the key service keeps
# no answer (AWS IAM always; HTTP after 24 h). A person revokes the replaced key K (docs: revoke a
# leaked key at the key service). `_settle`'s NotFound branch deletes the record without looking at
# the successor the record names (issued_key_id) or at sink A: sink B keeps serving revoked K forever,
# though rotator could copy N from sink A (what `_drop_orphan` does when K is alive).
def test_revoked_predecessor_drops_a_finishable_partial_store(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    b = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    store(b, keyservice, emulator, k)          # sink B served K before the rotation, as it would
    store(file_sink, keyservice, emulator, k)
    b.fail_next = [TransientError("down")] * 1000
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))  # no stored answers
    engine, events = overlap_engine(keyservice, state, [file_sink, b], Clock(), sink_retry_s=0.0, horizon_s=0.0)
    assert engine.rotate(KeyRef("acme", k), trigger="manual", force=True).status == "at_risk"
    n = successor_of(keyservice, k)
    n_secret = emulator.current_secret("acme", n.key_id)
    assert file_sink.read_secret(n).reveal() == n_secret          # sink A holds the successor
    keyservice.revoke_key("acme", k)                              # a person revokes leaked K
    b.fail_next = []
    print([(r.status, r.reason) for r in engine.recover_all()])
    drift, repaired = engine.repair()
    print([(d.certain, d.reason) for d in drift], [(r.status, r.reason) for r in repaired])
    print(events.names())
    n = keyservice.get_key("acme", n.key_id)
    assert any(v.get("api_key") == n_secret for v in b.versions(n)), \
        "sink B still serves revoked K; N's secret was in sink A and the record named N"


# F4: after a late store, the key.retiring event (and the result's reason, and the metric
# rotator_key_revoke_timestamp_seconds, metrics.py:61) announce revoke_at = successor CreationDate +
# grace, while the engine revokes at stored_at + grace (engine.py:936 vs engine.py:525).
DAY = 86_400


def test_retiring_event_announces_the_wrong_revoke_time(emulator, keyservice, state, keys, file_sink) -> None:
    k = keys["payments"]
    late = registry.build("memory", {"path": "{client_id}/{alias}"}, FP)
    late.fail_next = [TransientError("sealed")] * 1000
    clock = Clock()
    engine, events = overlap_engine(keyservice, state, [file_sink, late], clock, sink_retry_s=0.0)
    assert engine.rotate(KeyRef("acme", k), trigger="schedule").status == "at_risk"
    late.fail_next = []
    clock.shift = 5 * DAY
    [recovered] = engine.recover_all()
    n = successor_of(keyservice, k)
    real = utc_iso(engine.retire_at(keyservice.get_key("acme", k), n))
    announced = dict(events.events[-1].details or {})["revoke_at"]
    print("announced", announced, "real", real, "|", recovered.reason)
    assert announced == real
