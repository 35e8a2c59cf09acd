"""The seven failures of the first protocol, each reproduced against the real CLI or worker, Redis
and HTTP servers: every one ends with each key reset once and its live secret in every sink."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.sinks import registry
from rotator.sinks.memory import MemorySink
from rotator.state import LeaseLostError, RedisState
from tests.conftest import FP_KEY
from tests.signed import local_signer, publishing_as
from tests.test_celery import Cluster, reset_counts, settled, vault, wait_for
from tests.vault_server import VaultTestServer

pytestmark = pytest.mark.slow
__all__ = ["vault"]  # the Vault test server fixture, shared with test_celery
CLIENT = "acme-prod"


@pytest.fixture
def cluster(tmp_path: Any, redis_server: str, emulator: Emulator, emulator_server: Any,
            vault: VaultTestServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, redis_server, emulator_server.url, vault.url, vault.root_token)
    c.env["ROTATOR_ENGINE__SINK_RETRY_S"] = "1"
    yield c
    c.stop()


@pytest.fixture
def keys(emulator: Emulator) -> dict[str, str]:
    now = emulator.now()
    c = emulator.add_client(CLIENT, "Acme", created_at=now - 400 * 86_400)
    return {"due1": next(iter(c.keys)),
            "due2": emulator.add_key(CLIENT, "payouts", created_at=now - 95 * 86_400).id,
            "young": emulator.add_key(CLIENT, "reports", created_at=now - 10 * 86_400).id}


def rotate(cluster: Cluster, key_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cluster.cli("rotate", "--client-id", CLIENT, "--key-id", key_id, "--apply", "--json", *extra)


def repair(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    result = cluster.cli("reconcile", "--repair", "--json")
    return result.returncode, json.loads(result.stdout)


def statuses(report: dict[str, Any]) -> list[str]:
    return [r["status"] for r in report["repaired"]]


def test_1_an_unanswered_reset_that_commits_later_is_never_reset_again(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, keys: dict[str, str]
) -> None:
    """The answer is lost and the reset commits 10 s later: the next trigger and a repair run in
    between find it in doubt and reset nothing; once it committed, the repair stores it. One reset."""
    emulator.add_fault(Fault(method="POST", path="/reset$", commit_after_s=10.0))  # cut, commits later
    emulator.add_fault(Fault(method="POST", path="/reset$", drop="before", times=20))  # retries cut too
    first = rotate(cluster, keys["due1"])
    assert first.returncode == 1 and json.loads(first.stdout)["results"][0]["status"] == "in_doubt"
    again = rotate(cluster, keys["due1"])
    assert again.returncode == 1 and json.loads(again.stdout)["results"][0]["status"] == "in_doubt"
    code, report = repair(cluster)
    assert code == 1 and report["unrepaired"] >= 1 and "in_doubt" in statuses(report)
    assert len(emulator.ledger) <= 1  # only the late commit itself, if it came already
    wait_for(lambda: len(emulator.ledger) == 1, 15, "the late commit")
    emulator.clear_faults()
    code, report = repair(cluster)
    assert code == 0, report
    assert "recovered" in statuses(report)
    assert reset_counts(emulator) == {keys["due1"]: 1}
    assert settled(cluster, emulator, keyservice, [keys["due1"]])


def test_2_a_gateway_5xx_while_the_origin_commits_loses_nothing(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, keys: dict[str, str]
) -> None:
    """A proxy answers 504 (then 502 to every retry) while the origin commits 8 s later: in doubt,
    not "not reset"; the repair stores the committed secret and never resets again."""
    emulator.add_fault(Fault(method="POST", path="/reset$", status=504, commit_after_s=8.0))
    emulator.add_fault(Fault(method="POST", path="/reset$", status=502, times=20))
    first = rotate(cluster, keys["due1"])
    assert first.returncode == 1 and json.loads(first.stdout)["results"][0]["status"] == "in_doubt"
    code, report = repair(cluster)
    assert code == 1 and "in_doubt" in statuses(report)
    wait_for(lambda: len(emulator.ledger) == 1, 14, "the origin's commit")
    emulator.clear_faults()
    code, report = repair(cluster)
    assert code == 0 and "recovered" in statuses(report), report
    assert reset_counts(emulator) == {keys["due1"]: 1}
    assert settled(cluster, emulator, keyservice, [keys["due1"]])


def test_3_a_redelivered_forced_message_resets_once(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, keys: dict[str, str]
) -> None:
    """`rotate_key` with force, delivered twice per key to a real worker: each key reset once,
    whatever the key service's clock says (the trigger carries the generation it saw)."""
    emulator.clock_offset_s = -30  # the key service's clock behind this host's
    cluster.worker()
    from celery import Celery

    app = Celery(broker=cluster.broker_url)
    app.conf.task_default_queue = "rotator"
    for name in ("due1", "due2", "young"):
        seen = str(keyservice.get_key(CLIENT, keys[name]).generation)
        task_id = str(uuid.uuid4())
        with publishing_as(local_signer(), same_stamp=True):
            for _ in range(2):
                app.send_task("rotator.rotate_key", args=[CLIENT, keys[name], "manual", seen, True], task_id=task_id)
    wait_for(lambda: settled(cluster, emulator, keyservice, list(keys.values())), 60, "three rotations")
    time.sleep(2)
    assert reset_counts(emulator) == {keys["due1"]: 1, keys["due2"]: 1, keys["young"]: 1}


def test_4_a_worker_that_lost_its_lease_stops_before_its_reset(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str]
) -> None:
    """A worker freezes past its lease (here: inside a sink's prepare); another takes the key and
    rotates it. The first notices the loss and stops before its reset; its stale writes are refused."""
    fp = __import__("rotator.fingerprint", fromlist=["Fingerprinter"]).Fingerprinter(FP_KEY)
    frozen, thawed = threading.Event(), threading.Event()

    class FreezingSink(MemorySink):
        def prepare(self, key: Any) -> None:
            if threading.current_thread().name == "first":
                frozen.set()
                thawed.wait(20)
            super().prepare(key)

    sink = FreezingSink(MemorySink.Config(), fp)

    def engine() -> Engine:
        return Engine(keyservice, [sink], state, CapturePublisher(), fp, Policy(), lock_ttl_s=1.5)

    ref = KeyRef(CLIENT, keys["due1"])
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(engine().rotate(ref, trigger="schedule")), name="first")
    first.start()
    assert frozen.wait(10)
    state.client.delete(f"{state.ns}:lock:key:{ref}")  # the freeze outlived the lease: it expired
    second = engine().rotate(ref, trigger="manual")
    assert second.status == "succeeded", second.reason
    thawed.set()
    first.join(20)
    assert results[0].status == "busy" and "lost" in results[0].reason
    assert reset_counts(emulator) == {keys["due1"]: 1}
    assert state.attempts() == []


def test_4_a_worker_frozen_between_its_record_and_its_reset_does_not_reset(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str]
) -> None:
    """The whole process freezes (heartbeat too) right after its fenced record write, past its
    lease; another worker takes the key and finds the record in doubt. The first, thawed, finds
    its lease no longer surely its own (its last extension is older than the TTL) and does not send
    its reset; after the horizon the other sends that same key: one reset."""
    from rotator.fingerprint import Fingerprinter

    fp = Fingerprinter(FP_KEY)
    sink = registry.build("memory", {}, fp)
    real_save = state.save_attempt
    frozen_once: list[bool] = []

    def save_then_freeze(attempt: Any, lease: Any) -> None:
        real_save(attempt, lease)
        if threading.current_thread().name == "first" and not frozen_once:
            frozen_once.append(True)
            lease._stop.set()  # the heartbeat freezes with the process
            time.sleep(1.3)  # past the 1 s lease: Redis expires it
            results.append(other.rotate(KeyRef(CLIENT, keys["due1"]), trigger="manual"))

    state.save_attempt = save_then_freeze  # type: ignore[method-assign]
    other = Engine(keyservice, [sink], RedisState(state.client, state.ns), CapturePublisher(), fp, Policy(),
                   lock_ttl_s=1.0, horizon_s=0.5)
    results: list[Any] = []
    engine = Engine(keyservice, [sink], state, CapturePublisher(), fp, Policy(), lock_ttl_s=1.0)
    first = threading.Thread(target=lambda: results.append(engine.rotate(KeyRef(CLIENT, keys["due1"]),
                                                                         trigger="schedule")), name="first")
    first.start()
    first.join(30)
    second, frozen = results
    assert second.status == "in_doubt", second.reason  # the first may have sent: nothing resets meanwhile
    assert frozen.status == "busy" and "lost" in frozen.reason
    assert emulator.ledger == []  # the thawed worker did not send its reset
    time.sleep(0.6)
    assert [r.status for r in other.recover_all()] == ["recovered"]  # the same key, sent once
    assert reset_counts(emulator) == {keys["due1"]: 1}


def test_4_fenced_writes_refuse_a_lost_lease_and_a_dead_owner_is_taken_over(
    state: RedisState, redis_server: str
) -> None:
    """Record writes and deletes check the lease in one script; a lease whose owner process died on
    this host is taken over at once instead of after its TTL."""
    from rotator.domain import AttemptRecord

    ref = KeyRef(CLIENT, "key_fenced")
    record = AttemptRecord(CLIENT, "key_fenced", "a1", "1:1", 0, "test", 0.0)
    old = state.acquire(f"key:{ref}", 60)
    assert old is not None
    state.client.delete(old.name)
    new = state.acquire(f"key:{ref}", 60)
    assert new is not None
    with pytest.raises(LeaseLostError):
        state.save_attempt(record, old)
    state.save_attempt(record, new)
    with pytest.raises(LeaseLostError):
        state.delete_attempt(record, old)
    stranger = AttemptRecord(CLIENT, "key_fenced", "a2", "1:1", 0, "test", 0.0)
    with pytest.raises(LeaseLostError):  # compare-and-delete: only the record's own attempt deletes it
        state.delete_attempt(stranger, new)
    assert state.get_attempt(ref) == record
    new.release()
    # A process on this host takes a lease and dies without releasing it.
    code = (f"from rotator.state import RedisState; s = RedisState.from_url({redis_server + '/0'!r}, "
            f"namespace={state.ns!r}); assert s.acquire('key:dead/owner', 600)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    started = time.monotonic()
    assert state.acquire("key:dead/owner", 600) is not None
    assert time.monotonic() - started < 1
    assert state.acquire("key:dead/owner", 600) is None  # a live owner (this process) is respected


def test_5_repair_behind_a_live_lease_is_not_reported_repaired(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, vault: VaultTestServer, keys: dict[str, str],
    redis_server: str,
) -> None:
    """A worker killed between the reset and the sink write: while another live process holds the
    key, `reconcile --repair` exits 1 and says what is left; then (the dead worker's lease taken
    over at once) it repairs with no second reset and exits 0."""
    vault.state.hold_writes.clear()
    worker = cluster.worker()
    assert rotate(cluster, keys["due1"], "--enqueue").returncode == 0
    wait_for(lambda: len(emulator.ledger) == 1, 30, "the reset")
    wait_for(lambda: ("POST", f"secret/data/rotator/{CLIENT}/{keys['due1']}") in vault.state.requests, 30,
             "the vault write")
    cluster.kill(worker)
    vault.state.hold_writes.set()
    store = RedisState.from_url(redis_server + "/0")
    live = store.acquire(f"key:{CLIENT}/{keys['due1']}", 30)  # the dead worker's lease is taken over at once
    assert live is not None
    result = cluster.cli("reconcile", "--repair")
    assert result.returncode == 1
    assert "left unrepaired" in result.stderr and "busy" in result.stdout
    assert "1 repaired" not in result.stderr and "2 repaired" not in result.stderr
    live.release()
    code, report = repair(cluster)
    assert code == 0 and "recovered" in statuses(report), report
    assert reset_counts(emulator) == {keys["due1"]: 1}
    assert settled(cluster, emulator, keyservice, [keys["due1"]])


class LosingSink(MemorySink):
    """Acknowledges every write and keeps none of them (a replica that lost it)."""

    losing = True

    def write(self, record: Any, prepared: object = None) -> Any:
        if self.losing:
            return None
        return super().write(record, prepared)


def test_6_an_acknowledged_write_that_does_not_read_back_keeps_the_record(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str]
) -> None:
    """A sink acknowledged the write but reads back another fingerprint: at risk, the record kept
    (storing), the critical event out; once the sink works, recovery stores the same secret."""
    from rotator.fingerprint import Fingerprinter

    fp = Fingerprinter(FP_KEY)
    sink = LosingSink(MemorySink.Config(name="losing"), fp)
    events = CapturePublisher()
    engine = Engine(keyservice, [registry.build("memory", {}, fp), sink], state, events, fp, Policy())
    result = engine.rotate(KeyRef(CLIENT, keys["due1"]), trigger="test")
    assert result.status == "at_risk" and "read-back" in result.reason
    assert events.names() == ["rotation.secret_at_risk"]
    [record] = state.attempts()
    assert record.phase == "storing"
    sink.losing = False
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert reset_counts(emulator) == {keys["due1"]: 1}
    live = fp(emulator.current_secret(CLIENT, keys["due1"]))
    assert sink.read_state(keyservice.get_key(CLIENT, keys["due1"])).fingerprint == live


def test_6_a_redis_error_never_swallows_the_critical_event(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str]
) -> None:
    """The sinks failed and Redis fails at that moment too: the critical event is already out, the
    result says at risk, and the record written before the reset still leads recovery to a replay."""
    from rotator.fingerprint import Fingerprinter

    fp = Fingerprinter(FP_KEY)
    sink = registry.build("memory", {}, fp)
    sink.fail_next = [__import__("rotator.errors", fromlist=["PermanentError"]).PermanentError("down")]
    real_save = state.save_attempt

    def failing_save(attempt: Any, lease: Any) -> None:
        if attempt.phase == "storing":
            raise redis.ConnectionError("Redis went away")
        real_save(attempt, lease)

    state.save_attempt = failing_save  # type: ignore[method-assign]
    events = CapturePublisher()
    engine = Engine(keyservice, [sink], state, events, fp, Policy())
    result = engine.rotate(KeyRef(CLIENT, keys["due1"]), trigger="test")
    assert result.status == "at_risk"
    assert events.names() == ["rotation.secret_at_risk"]
    state.save_attempt = real_save  # type: ignore[method-assign]
    assert [r.status for r in engine.recover_all()] == ["recovered"]
    assert reset_counts(emulator) == {keys["due1"]: 1}


@pytest.mark.parametrize("rotated_before", [False, True], ids=["first-rotation", "rotated-before"])
def test_7_redis_lost_after_an_unstored_reset_is_repaired_by_replay(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, vault: VaultTestServer, keys: dict[str, str],
    rotated_before: bool,
) -> None:
    """The reset ran, Vault refused the write past the bound, then Redis lost everything (no record,
    no history). `reconcile --repair` finds the secret again by replaying the reset that produced
    the key's generation, with no second reset."""
    key_id = keys["due1"]
    if rotated_before:
        assert rotate(cluster, key_id).returncode == 0
        emulator.clock_offset_s = 5  # the next reset gets a later date
    vault.state.fail_data_writes = 1000
    failed = rotate(cluster, key_id, *(["--force"] if rotated_before else []))
    assert failed.returncode == 1 and json.loads(failed.stdout)["results"][0]["status"] == "at_risk"
    cluster.db.flushall()  # a Redis restart without persistence
    vault.state.fail_data_writes = 0
    resets = len(emulator.ledger)
    code, report = repair(cluster)
    assert code == 0, report
    assert report["drift"] and "recovered" in statuses(report)
    assert len(emulator.ledger) == resets
    assert settled(cluster, emulator, keyservice, [key_id])
    assert cluster.cli("reconcile").returncode == 0


def test_4_a_message_for_a_key_behind_a_live_lease_is_retried_not_dropped(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, keys: dict[str, str], redis_server: str
) -> None:
    """A `rotate_key` that finds the key leased by another live actor is retried after the lease,
    then does its work: the trigger is never dropped as "skipped"."""
    cluster.worker()
    holder = RedisState.from_url(redis_server + "/0").acquire(f"key:{CLIENT}/{keys['due1']}", 60)
    assert holder is not None
    from celery import Celery

    app = Celery(broker=cluster.broker_url)
    app.conf.task_default_queue = "rotator"
    seen = str(keyservice.get_key(CLIENT, keys["due1"]).generation)
    with publishing_as(local_signer()):
        app.send_task("rotator.rotate_key", args=[CLIENT, keys["due1"], "schedule", seen])
    time.sleep(3)
    assert emulator.ledger == []
    holder.release()
    wait_for(lambda: settled(cluster, emulator, keyservice, [keys["due1"]]), 30, "the retried rotation")
    assert reset_counts(emulator) == {keys["due1"]: 1}


@pytest.mark.parametrize("rotated_before", [False, True], ids=["first-rotation", "rotated-before"])
def test_7_a_failing_replay_is_never_read_as_nothing_to_replay(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, vault: VaultTestServer, keys: dict[str, str],
    rotated_before: bool,
) -> None:
    """Redis lost, and the replay endpoint answers 503 for a while: the repair says the key is left
    unrepaired (exit 1) and neither reports "0 drifted" nor resets afresh; once replay works, it
    stores the same secret. Still one reset per rotation."""
    key_id = keys["due1"]
    if rotated_before:
        assert rotate(cluster, key_id).returncode == 0
        emulator.clock_offset_s = 5
    vault.state.fail_data_writes = 1000
    assert rotate(cluster, key_id, *(["--force"] if rotated_before else [])).returncode == 1
    cluster.db.flushall()
    vault.state.fail_data_writes = 0
    resets = len(emulator.ledger)
    emulator.add_fault(Fault(method="GET", path="/responses/", status=503, times=6))
    code, report = repair(cluster)
    assert code == 1 and report["drift"] and report["unrepaired"] >= 1, report
    assert len(emulator.ledger) == resets
    emulator.clear_faults()
    code, report = repair(cluster)
    assert code == 0 and "recovered" in statuses(report), report
    assert len(emulator.ledger) == resets
    assert settled(cluster, emulator, keyservice, [key_id])


def test_5_an_unreadable_sink_does_not_hide_the_drift_of_the_others(
    cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, vault: VaultTestServer, keys: dict[str, str]
) -> None:
    """A key reset outside rotator leaves both sinks stale; with Vault unreadable, reconcile still
    reports the file sink's drift and Vault as unknown, exits 1, and --repair resets nothing."""
    key_id = keys["due1"]
    assert rotate(cluster, key_id).returncode == 0
    emulator.clock_offset_s = 5
    keyservice.reset_key(CLIENT, key_id, "outside-reset-0000001")
    vault.state.sealed = True
    result = cluster.cli("reconcile", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    reasons = {d["sink"].split(":")[0]: d["reason"] for d in report["drift"]}
    assert "stored rotation is from" in reasons["file"] and "unreadable" in reasons["vault"]
    resets = len(emulator.ledger)
    code, report = repair(cluster)
    assert code == 1 and len(emulator.ledger) == resets
