"""The overlap strategy against the emulator over HTTP, real Redis, the encrypted file sink and a
Vault test server: a due revocable key gets a successor with its alias and scopes, stored and
verified; the old key keeps working until its grace is over and is revoked after, never while a
sink still holds it; a crash or a lost answer anywhere is finished without a second create."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from rotator.config import ConfigError, settings_from_mapping
from rotator.domain import ApiKey, Environment, KeyRef, Secret
from rotator.engine import Engine
from rotator.errors import NotFoundError
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.http import HttpKeyService
from rotator.places import due_with_places
from rotator.policy import Policy, assess
from rotator.protocols import SecretRecord
from rotator.scan import ScanRow
from rotator.sinks import registry
from rotator.state import RedisState
from tests.crashes import Crash, Dies
from tests.test_engine import FP
from tests.vault_server import VaultTestServer

DAY = 86_400
GRACE = 7 * DAY
SCOPES = [{"Scope": "Payins", "Read": True, "Write": True}, {"Scope": "Users", "Read": True, "Write": False}]


@pytest.fixture
def keys(emulator: Emulator) -> dict[str, str]:
    now = emulator.now()
    client = emulator.add_client("acme", "Acme", created_at=now - 400 * DAY)
    payments = emulator.add_key("acme", "payments", SCOPES, created_at=now - 100 * DAY).id
    return {"auto": next(iter(client.keys)), "payments": payments}


@pytest.fixture
def file_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    return registry.build("file", {"dir": str(tmp_path / "secrets"), "path": "{client_id}/{alias}.secret"}, FP)


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> Iterator[VaultTestServer]:
    with VaultTestServer() as server:
        monkeypatch.setenv("VAULT_TOKEN", server.root_token)
        yield server


class Clock:
    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


def overlap_engine(keyservice: HttpKeyService, state: RedisState, sinks: list[Any], clock: Clock | None = None,
                   **kw: Any) -> tuple[Engine, CapturePublisher]:
    events = CapturePublisher()
    policy = Policy(strategy="overlap", overlap_grace_s=GRACE)
    return Engine(keyservice, sinks, state, events, FP, policy, clock=clock or Clock(), **kw), events


def successor_of(keyservice: HttpKeyService, key_id: str) -> ApiKey:
    found = [k for k in keyservice.list_keys("acme") if k.replaces == key_id]
    assert len(found) == 1, found
    return found[0]


def holds(sink: Any, emulator: Emulator, key: ApiKey) -> bool:
    stored = sink.read_state(key)
    return (stored is not None and stored.key_id == key.key_id
            and stored.fingerprint == FP(emulator.current_secret("acme", key.key_id)))


def alias_vault(server: VaultTestServer) -> Any:
    return registry.build("vault", {"url": server.url, "path": "rotator/{client_id}/{alias}"}, FP)


def test_a_due_key_gets_a_successor_and_is_revoked_only_after_its_grace(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
    vault: VaultTestServer,
) -> None:
    old = keys["payments"]
    old_secret = emulator.current_secret("acme", old)
    before = keyservice.get_key("acme", old)
    sinks, clock = [file_sink, alias_vault(vault)], Clock()
    engine, events = overlap_engine(keyservice, state, sinks, clock)

    result = engine.rotate(KeyRef("acme", old), trigger="test")
    assert result.status == "succeeded", result.reason
    new = successor_of(keyservice, old)
    assert (new.alias, new.scopes, new.environment) == (before.alias, before.scopes, before.environment)
    assert keyservice.get_key("acme", old).replaced_by == new.key_id
    assert emulator.check_secret("acme", old_secret)  # the old secret still works during the grace
    assert all(holds(s, emulator, new) for s in sinks)
    assert emulator.ledger == []  # nothing was reset: a create, not a reset
    assert state.attempts() == []
    assert events.names() == ["rotation.succeeded", "key.retiring"]
    assert events.events[-1].key_id == old and dict(events.events[-1].details or {})["successor"] == new.key_id

    clock.shift = GRACE - 60  # inside the grace: nothing happens
    waiting = engine.rotate(KeyRef("acme", old), trigger="schedule", generation=str(before.generation))
    assert waiting.status == "skipped" and "retiring" in waiting.reason
    forced = engine.rotate(KeyRef("acme", old), trigger="manual", force=True)  # a second forced run
    assert forced.status == "skipped" and "retiring" in forced.reason
    assert emulator.check_secret("acme", old_secret)

    clock.shift = GRACE + 60
    revoked = engine.rotate(KeyRef("acme", old), trigger="schedule", generation=str(before.generation))
    assert revoked.status == "succeeded" and "revoked" in revoked.reason, revoked.reason
    with pytest.raises(NotFoundError):
        keyservice.get_key("acme", old)
    assert not emulator.check_secret("acme", old_secret)
    assert keyservice.get_key("acme", new.key_id).replaces is None
    assert "key.revoked" in events.names()
    again = engine.rotate(KeyRef("acme", new.key_id), trigger="schedule")
    assert again.status == "skipped" and again.reason == "not due"


def test_the_auto_generated_key_is_reset_not_replaced(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    engine, events = overlap_engine(keyservice, state, [file_sink])
    result = engine.rotate(KeyRef("acme", keys["auto"]), trigger="test")
    assert result.status == "succeeded", result.reason
    assert [e.key_id for e in emulator.ledger] == [keys["auto"]]  # one reset of the same key
    assert all(k.replaces is None for k in keyservice.list_keys("acme"))
    assert holds(file_sink, emulator, keyservice.get_key("acme", keys["auto"]))
    assert "key.retiring" not in events.names()


def test_nothing_is_revoked_while_a_sink_holds_the_old_key(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
    tmp_path: Path,
) -> None:
    """A sink that holds the old key's document again (a restored backup, a second writer) stops
    the revoke; `reconcile --repair` stores the successor again from the create's replay, found
    from the key service and the sinks alone, without a second create."""
    old = keys["payments"]
    old_secret = emulator.current_secret("acme", old)
    key = keyservice.get_key("acme", old)
    secret = Secret(old_secret)
    file_sink.write(SecretRecord(key, secret, "a2-earlier", FP(secret), float(key.born_at)), file_sink.prepare(key))
    path = tmp_path / "secrets" / "acme" / "payments.secret"
    old_document = path.read_bytes()
    engine, _ = overlap_engine(keyservice, state, [file_sink], clock := Clock())
    assert engine.rotate(KeyRef("acme", old), trigger="test").status == "succeeded"
    new = successor_of(keyservice, old)
    assert holds(file_sink, emulator, new)  # the successor took the old key's place
    path.write_bytes(old_document)

    clock.shift = GRACE + 60
    refused = engine.rotate(KeyRef("acme", old), trigger="schedule")
    assert refused.status == "failed" and "does not hold successor" in refused.reason, refused.reason
    assert keyservice.get_key("acme", old).replaced_by == new.key_id
    assert emulator.check_secret("acme", old_secret)

    drift, results = engine.repair()
    assert [d.key.key_id for d in drift] == [new.key_id]
    assert [r.status for r in results] == ["recovered"], [r.reason for r in results]
    assert holds(file_sink, emulator, new)
    assert len([k for k in keyservice.list_keys("acme") if k.alias == "payments"]) == 2  # no third key
    # The grace counts from when every sink held the successor: the restored sink's consumers get it all.
    waiting = engine.rotate(KeyRef("acme", old), trigger="schedule")
    assert waiting.status == "skipped" and "retiring" in waiting.reason, waiting.reason
    clock.shift = 2 * GRACE + 120
    assert engine.rotate(KeyRef("acme", old), trigger="schedule").status == "succeeded"
    with pytest.raises(NotFoundError):
        keyservice.get_key("acme", old)


def test_a_crash_between_create_and_store_is_finished_by_recovery(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    old = keys["payments"]
    engine, _ = overlap_engine(keyservice, state, [Dies(file_sink)])
    with pytest.raises(Crash):
        engine.rotate(KeyRef("acme", old), trigger="test")
    [pending] = state.attempts()
    assert pending.action == "create" and pending.phase == "resetting"
    new = successor_of(keyservice, old)
    assert file_sink.read_state(new) is None or file_sink.read_state(new).key_id != new.key_id

    survivor, events = overlap_engine(keyservice, state, [file_sink])
    [result] = survivor.recover_all()
    assert result.status == "recovered", result.reason
    assert holds(file_sink, emulator, new)
    assert successor_of(keyservice, old).key_id == new.key_id  # the same successor: no second create
    assert state.attempts() == []
    assert "key.retiring" in events.names()


def test_a_create_whose_answer_was_cut_is_replayed_not_repeated(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    old = keys["payments"]
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", drop="after"))
    engine, events = overlap_engine(keyservice, state, [file_sink])
    result = engine.rotate(KeyRef("acme", old), trigger="test")
    assert result.status == "succeeded", result.reason
    new = successor_of(keyservice, old)
    assert holds(file_sink, emulator, new)
    assert len([k for k in keyservice.list_keys("acme") if k.alias == "payments"]) == 2  # one create ran
    assert events.names() == ["rotation.succeeded", "key.retiring"]


def test_a_lost_create_revokes_the_successor_nobody_holds_and_creates_again(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    """The answer was cut and the stored response is gone (expired): past the horizon, the
    successor that create made is held by no sink, so it is revoked and a new one created under
    the next epoch's key."""
    old = keys["payments"]
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", drop="after", times=-1))
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))
    engine, events = overlap_engine(keyservice, state, [file_sink], horizon_s=0.0)
    first = engine.rotate(KeyRef("acme", old), trigger="test")
    assert first.status == "failed", first.reason
    emulator.clear_faults()
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))
    assert state.attempts() == []  # the orphan is revoked and its epoch burnt: nothing outstanding
    assert all(k.replaces is None for k in keyservice.list_keys("acme"))  # no successor blocks the next
    assert "rotation.secret_at_risk" in events.names()

    second = engine.rotate(KeyRef("acme", old), trigger="test")
    assert second.status == "succeeded", second.reason
    new = successor_of(keyservice, old)
    assert holds(file_sink, emulator, new)
    assert len([k for k in keyservice.list_keys("acme") if k.alias == "payments"]) == 2


def test_a_refused_create_after_a_lost_create_is_an_ordinary_refusal(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    """A lost create loses no secret anyone holds (its orphan is revoked; the old key and its stored
    secret live on), so the fresh create after it is no repair: refused, it ends like any refusal
    and the next trigger creates again. It must not be kept as a lost secret, burning an epoch and
    raising a critical event on every sweep."""
    old = keys["payments"]
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", drop="after"))
    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=503, times=-1))  # cannot settle it now
    patient, _ = overlap_engine(keyservice, state, [file_sink], horizon_s=3600.0)
    assert patient.rotate(KeyRef("acme", old), trigger="test").status == "in_doubt"
    emulator.clear_faults()
    emulator.clock_offset_s = 25 * 3600  # the create's stored answer expires: it is lost
    emulator.add_fault(Fault(method="POST", path=r"/acme/apikeys$", status=403, stored=True))
    engine, events = overlap_engine(keyservice, state, [file_sink], horizon_s=0.0)
    refused = engine.rotate(KeyRef("acme", old), trigger="test")
    assert refused.status == "failed" and "refused" in refused.reason, refused.reason
    assert state.attempts() == [] and events.names().count("rotation.secret_at_risk") == 1  # the lost create's
    assert keyservice.get_key("acme", old).status == "ACTIVE"  # the key consumers use lives on
    assert engine.rotate(KeyRef("acme", old), trigger="test").status == "succeeded"


def test_a_failed_revoke_is_retried_and_never_revokes_twice(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    old = keys["payments"]
    engine, events = overlap_engine(keyservice, state, [file_sink], clock := Clock())
    assert engine.rotate(KeyRef("acme", old), trigger="test").status == "succeeded"
    clock.shift = GRACE + 60
    emulator.add_fault(Fault(method="DELETE", path=r"/apikeys/", status=503, times=-1))
    failed = engine.rotate(KeyRef("acme", old), trigger="schedule")
    assert failed.status == "failed" and "revoking failed" in failed.reason
    assert keyservice.get_key("acme", old).replaced_by is not None
    emulator.clear_faults()
    assert engine.rotate(KeyRef("acme", old), trigger="schedule").status == "succeeded"
    assert events.names().count("key.revoked") == 1
    gone = engine.rotate(KeyRef("acme", old), trigger="schedule")
    assert gone.status == "failed" and "not found" in gone.reason.lower()


def test_overlap_refuses_a_sink_whose_place_names_the_key_id(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], env: Any,
) -> None:
    engine, _ = overlap_engine(keyservice, state, [registry.build("memory", {}, FP), vault_sink_default()])
    result = engine.rotate(KeyRef("acme", keys["payments"]), trigger="test")
    assert result.status == "failed" and "{alias}" in result.reason
    assert all(k.replaces is None for k in keyservice.list_keys("acme"))  # nothing was created
    with pytest.raises(ConfigError, match="overlap_grace_s"):
        settings_from_mapping({"keyservice": {"url": "http://127.0.0.1:1"},
                               "policy": {"strategy": "overlap", "max_age_days": 7, "warn_before_days": 1},
                               "sinks": [{"kind": "memory", "path": "{client_id}/{alias}"}]})
    with pytest.raises(ConfigError, match=r"\{alias\}"):
        settings_from_mapping({"keyservice": {"url": "http://127.0.0.1:1"}, "policy": {"strategy": "overlap"},
                               "sinks": [{"kind": "vault", "url": "http://127.0.0.1:8200"}]})


def vault_sink_default() -> Any:
    return registry.build("vault", {"url": "http://127.0.0.1:1"}, FP)


def test_a_scan_includes_a_retiring_key_once_its_grace_is_over_and_its_place_is_shared_by_design(
    file_sink: Any,
) -> None:
    policy = Policy(strategy="overlap", overlap_grace_s=GRACE)
    now = 1_800_000_000
    old = ApiKey("acme", "key_old", "payments", Environment.PRODUCTION, (), now - 200 * DAY, None,
                 replaced_by="key_new")
    new = ApiKey("acme", "key_new", "payments", Environment.PRODUCTION, (), now - 3 * DAY, None, replaces="key_old")

    def rows() -> list[ScanRow]:
        return [ScanRow(k, *assess(k, now, policy)) for k in (old, new)]

    assert assess(old, now, policy)[0].value == "retiring"
    def engine_like(key: ApiKey, successor: ApiKey) -> float:  # Engine.retire_at with nothing recorded
        return successor.created_at + policy.overlap_grace_s

    assert due_with_places(rows(), [file_sink], engine_like, now) == []  # 3 days into a 7-day grace
    later = now + 5 * DAY
    assert due_with_places(rows(), [file_sink], engine_like, later) == [(old, None)]  # no collision


def test_the_cli_rotates_by_overlap_for_one_run_and_status_shows_the_retiring_key(
    tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator, emulator_server: Any,
    keys: dict[str, str],
) -> None:
    import json
    import uuid

    from typer.testing import CliRunner

    from rotator.cli import app
    from tests.conftest import write_config

    env.setenv("ROTATOR_STATE__NAMESPACE", f"overlap-{uuid.uuid4().hex[:8]}")
    path = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server, clients=["acme"],
                        sinks='kind = "memory"\npath = "{client_id}/{alias}"')
    runner = CliRunner()
    old = keys["payments"]
    one = ["--client-id", "acme", "--key-id", old, "--config", str(path), "--strategy", "overlap"]
    plan = runner.invoke(app, ["rotate", *one])
    assert plan.exit_code == 0 and "would rotate" in plan.stdout and "overlap" in plan.stdout, plan.output
    applied = runner.invoke(app, ["rotate", *one, "--apply", "--json"])
    assert applied.exit_code == 0, applied.output
    [result] = json.loads(applied.stdout)["results"]
    assert result["status"] == "succeeded" and "revoked after" in result["reason"]
    status = runner.invoke(app, ["status", "--json", "--config", str(path)])
    rows = {r["key_id"]: r for r in json.loads(status.stdout)["keys"]}
    successor = rows[old]["retiring"]["successor"]
    assert rows[old]["state"] == "retiring" and rows[old]["retiring"]["revoke_at"]
    assert rows[successor]["state"] == "ok" and rows[successor]["retiring"] is None
    again = runner.invoke(app, ["rotate", "--client-id", "acme", "--key-id", old, "--config", str(path)])
    assert "would skip" in again.stdout and "retiring" in again.stdout, again.output


def test_a_lost_create_that_every_sink_holds_starts_its_grace_when_it_is_settled(
    emulator: Emulator, keyservice: HttpKeyService, state: RedisState, keys: dict[str, str], file_sink: Any,
) -> None:
    """The process died after the successor's write and before it recorded that every sink held it;
    the stored answer is gone. Recovery finds every sink holding the successor and clears the record:
    the old key's grace counts from then, never from the successor's creation long before."""
    class DiesAfterWriting:
        def __init__(self, sink: Any) -> None:
            self.sink, self.wrote = sink, False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.sink, name)

        def write(self, record: Any, prepared: Any = None) -> Any:
            self.wrote = True
            return self.sink.write(record, prepared)

        def read_state(self, key: ApiKey) -> Any:
            if self.wrote:
                raise Crash()
            return self.sink.read_state(key)

    old = keys["payments"]
    clock = Clock()
    engine, _ = overlap_engine(keyservice, state, [DiesAfterWriting(file_sink)], clock=clock)
    with pytest.raises(Crash):
        engine.rotate(KeyRef("acme", old), trigger="test")
    new = successor_of(keyservice, old)
    assert holds(file_sink, emulator, new) and state.stored_rotation(KeyRef("acme", old)) is None

    emulator.add_fault(Fault(method="GET", path=r"/responses/", status=404, times=-1))  # the answer is gone
    clock.shift = 2 * GRACE  # long after the successor's creation
    survivor, _ = overlap_engine(keyservice, state, [file_sink], clock=clock, horizon_s=0.0)
    [settled] = survivor.recover_all()
    assert settled.status == "skipped" and "every sink" in settled.reason, settled.reason
    old_key = keyservice.get_key("acme", old)
    assert survivor.retire_at(old_key, new) >= clock() + GRACE - 5
    retire = survivor.rotate(KeyRef("acme", old), trigger="schedule")
    assert retire.status == "skipped" and "retiring" in retire.reason, retire.reason
    assert keyservice.get_key("acme", old).replaced_by == new.key_id  # not revoked
