"""Every sink path goes through `render`: ids cannot steer a path, aliases that slug alike are an
error (never an overwrite), and the file sink never writes outside its root (symlinks, FIFOs,
loose permissions)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from rotator.domain import ApiKey, Environment, KeyRef, Secret
from rotator.errors import PermanentError
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.protocols import SecretRecord
from rotator.sinks import registry
from rotator.sinks.base import render
from tests.conftest import FP_KEY, write_config
from tests.test_sinks import moto_url  # noqa: F401  (a session fixture: a moto server)
from tests.vault_server import VaultTestServer

FP = Fingerprinter(FP_KEY)
STEERING = ["../../outside", "../other-client/key_1", "/etc/passwd", ".", "..", "a/b", "a\x00b", "k" * 10_000,
            "a\\b", "%2e%2e", ""]


def key(key_id: str = "key_1", client_id: str = "acme", alias: str = "Payments", reset_at: int = 1_750_000_000) -> ApiKey:
    return ApiKey(client_id, key_id, alias, Environment.PRODUCTION, (), 1_700_000_000, reset_at, False)


def record(k: ApiKey, secret: str | None = None) -> SecretRecord:
    value = Secret(secret or f"prod_{uuid.uuid4().hex}")
    return SecretRecord(k, value, str(uuid.uuid4()), FP(value), time.time())


# --- render ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", STEERING, ids=lambda v: repr(v)[:24])
def test_render_refuses_ids_that_could_steer_a_path(bad: str) -> None:
    for k in (key(key_id=bad), key(client_id=bad)):
        with pytest.raises(PermanentError, match="is not an id") as info:
            render("rotator/{client_id}/{key_id}", k)
        assert "\x00" not in str(info.value) and len(str(info.value)) < 400


def test_render_keeps_a_path_under_its_template_prefix() -> None:
    assert render("rotator/{client_id}/{key_id}", key()) == "rotator/acme/key_1"
    assert render("rotator/{client_id}/{alias}", key(alias="Auto-generated key")) == "rotator/acme/auto-generated-key"
    with pytest.raises(PermanentError, match="longer than 1024 bytes"):
        render("/".join(["x" * 200] * 5) + "/{client_id}/{key_id}", key(key_id="k" * 128))


@pytest.mark.parametrize("template", ["/etc/{key_id}", "../{client_id}/{key_id}", "a//{key_id}", "a/./{key_id}",
                                      "rotator/{client_id}", "a\x00/{key_id}", "C:{key_id}", "a\\{key_id}"])
def test_templates_that_leave_their_place_are_config_errors(template: str) -> None:
    problems = registry.check("vault", {"url": "http://v:8200", "path": template}, {"VAULT_TOKEN": "x"})
    assert [k for k, _ in problems] == ["path"], problems
    problems = registry.check("aws", {"region": "eu-west-1", "name": template}, {})
    assert [k for k, _ in problems] == ["name"], problems


# --- Vault and AWS: a key id cannot leave the prefix; aliases that slug alike ------------------------

@pytest.fixture
def vault_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[VaultTestServer, Any]]:
    with VaultTestServer() as server:
        monkeypatch.setenv("VAULT_TOKEN", server.root_token)
        sink = registry.build("vault", {"url": server.url, "path": "rotator/{client_id}/{alias}"}, FP)
        yield server, sink
        sink.close()


@pytest.mark.parametrize("bad", ["../../../auth/token/create", "../../other/x", "."], ids=lambda v: repr(v)[:24])
def test_vault_key_id_cannot_reach_another_path(vault_sink: tuple[VaultTestServer, Any], bad: str) -> None:
    server, _ = vault_sink
    sink = registry.build("vault", {"url": server.url, "path": "rotator/{client_id}/{key_id}"}, FP)
    with pytest.raises(PermanentError, match="is not an id"):
        sink.prepare(key(key_id=bad))
    with pytest.raises(PermanentError, match="is not an id"):
        sink.write(record(key(key_id=bad)))
    assert server.state.secrets == {}
    assert not any("auth/token" in path for _, path in server.state.requests)


def test_vault_aliases_that_slug_alike_are_an_error_not_an_overwrite(vault_sink: tuple[VaultTestServer, Any]) -> None:
    """`Payments` and `payments!` of one client both render to rotator/acme/payments: the second key
    is refused before its reset (prepare) and at write; the first key's secret stays."""
    _, sink = vault_sink
    first = record(key("key_1", alias="Payments"))
    sink.write(first)
    second = key("key_2", alias="payments!")
    with pytest.raises(PermanentError, match="another key"):
        sink.prepare(second)
    with pytest.raises(PermanentError, match="another key") as info:
        sink.write(record(second))
    assert "acme/key_1" in str(info.value) or "'key_1'" in str(info.value)
    state = sink.read_state(key("key_1", alias="Payments"))
    assert state is not None and state.fingerprint == first.fingerprint


def test_aws_aliases_that_slug_alike_are_an_error(moto_url: str) -> None:  # noqa: F811
    sink: Any = registry.build("aws", {"region": "eu-west-1", "endpoint_url": moto_url,
                                       "name": "paths-test/{client_id}/{alias}"}, FP)
    client = f"c-{uuid.uuid4().hex[:8]}"
    first = record(key("key_1", client_id=client, alias="Payments"))
    sink.write(first)
    with pytest.raises(PermanentError, match="another key"):
        sink.prepare(key("key_2", client_id=client, alias="PAYMENTS"))
    with pytest.raises(PermanentError, match="another key"):
        sink.write(record(key("key_2", client_id=client, alias="PAYMENTS")))
    assert sink.read_document(key("key_1", client_id=client, alias="Payments"))["key_id"] == "key_1"
    with pytest.raises(PermanentError, match="is not an id"):
        sink.write(record(key("../../x", client_id=client)))


# --- the file sink ---------------------------------------------------------------------------------

@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("do not touch")
    return tmp_path


def file_sink(root: Path, path: str = "{client_id}/{key_id}.secret") -> Any:
    return registry.build("file", {"dir": str(root), "path": path}, FP)


def snapshot(directory: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for p in directory.rglob("*"):
        found[str(p.relative_to(directory))] = (
            "link" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes() if p.is_file() else "other")
    return found


@pytest.mark.parametrize("bad", STEERING, ids=lambda v: repr(v)[:24])
def test_file_sink_never_writes_outside_its_root(place: Path, bad: str) -> None:
    before = snapshot(place / "outside")
    sink = file_sink(place / "secrets")
    for k in (key(key_id=bad), key(client_id=bad)):
        with pytest.raises(PermanentError):
            sink.write(record(k))
        with pytest.raises(PermanentError):
            sink.prepare(k)
    assert snapshot(place / "outside") == before
    assert [p for p in place.rglob("*") if "secret" in p.name and p.is_file()] == []


def test_file_sink_refuses_a_root_that_is_a_symlink(place: Path) -> None:
    (place / "secrets").symlink_to(place / "outside", target_is_directory=True)
    sink = file_sink(place / "secrets")
    with pytest.raises(PermanentError, match="symlink"):
        sink.ping()
    with pytest.raises(PermanentError, match="symlink"):
        sink.write(record(key()))
    assert sorted(os.listdir(place / "outside")) == ["victim"]


def test_file_sink_refuses_a_root_writable_by_others(place: Path) -> None:
    root = place / "secrets"
    root.mkdir()
    root.chmod(0o777)
    sink = file_sink(root)
    with pytest.raises(PermanentError, match="writable by group or others"):
        sink.ping()
    with pytest.raises(PermanentError, match="writable by group or others"):
        sink.prepare(key())
    assert os.listdir(root) == []


def test_check_config_ping_says_the_root_is_writable_by_others(
    place: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    from rotator.cli import app

    root = place / "secrets"
    root.mkdir()
    root.chmod(0o777)
    config = place / "rotator.toml"
    config.write_text(f'[keyservice]\nurl = "{emulator_server.url}"\n[state]\nredis_url = "{redis_server}/0"\n'
                      f'[celery]\nbroker_url = "{redis_server}/1"\n[[sinks]]\nkind = "file"\ndir = "{root}"\n')
    result = CliRunner().invoke(app, ["check-config", "--ping", "--config", str(config)])
    assert result.exit_code == 1
    assert "writable by group or others" in result.stderr and f"fail file:{root}" in result.stderr


def test_file_sink_refuses_a_planted_symlink_at_the_target(place: Path) -> None:
    root = place / "secrets"
    sink = file_sink(root)
    sink.prepare(key())
    target = root / "acme" / "key_1.secret"
    target.symlink_to(place / "outside" / "victim")
    with pytest.raises(PermanentError, match="symlink|resolves outside"):
        sink.write(record(key()))
    with pytest.raises(PermanentError, match="symlink|resolves outside"):
        sink.read_state(key())
    target.unlink()
    target.symlink_to(root / "acme" / "elsewhere")  # a symlink that stays inside the root: refused too
    (root / "acme" / "elsewhere").write_bytes(b"")
    with pytest.raises(PermanentError, match="symlink"):
        sink.write(record(key()))
    assert (place / "outside" / "victim").read_text() == "do not touch"


def test_file_sink_refuses_a_planted_symlink_directory(place: Path) -> None:
    root = place / "secrets"
    root.mkdir(mode=0o700)
    (root / "acme").symlink_to(place / "outside", target_is_directory=True)
    sink = file_sink(root)
    with pytest.raises(PermanentError, match="outside|symlink"):
        sink.write(record(key()))
    assert sorted(os.listdir(place / "outside")) == ["victim"]


def test_file_sink_refuses_a_fifo_without_blocking(place: Path) -> None:
    root = place / "secrets"
    sink = file_sink(root)
    sink.prepare(key())
    os.mkfifo(root / "acme" / "key_1.secret")
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            sink.write(record(key()))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "the write blocked on a FIFO"
    assert isinstance(outcome[0], PermanentError) and "not a regular file" in str(outcome[0])
    with pytest.raises(PermanentError, match="not a regular file"):
        sink.prepare(key())


def test_file_sink_directories_are_0700_and_files_0600(place: Path) -> None:
    root = place / "secrets"
    sink = file_sink(root, "{environment}/{client_id}/{key_id}.secret")
    sink.write(record(key()))
    for directory in (root, root / "production", root / "production" / "acme"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE((root / "production" / "acme" / "key_1.secret").stat().st_mode) == 0o600


def test_file_sink_aliases_that_slug_alike_are_an_error(place: Path) -> None:
    sink = file_sink(place / "secrets", "{client_id}/{alias}.secret")
    first = record(key("key_1", alias="Payments"))
    sink.write(first)
    with pytest.raises(PermanentError, match="another key"):
        sink.prepare(key("key_2", alias="payments "))
    with pytest.raises(PermanentError, match="another key"):
        sink.write(record(key("key_2", alias="payments ")))
    fernet_key = os.environ["ROTATOR_FILE_KEY"].encode()
    stored = json.loads(Fernet(fernet_key).decrypt((place / "secrets" / "acme" / "payments.secret").read_bytes()))
    assert stored["key_id"] == "key_1" and stored["api_key"] == first.secret.reveal()


def test_keys_that_would_share_a_place_are_refused_before_any_reset(
    tmp_path: Path, emulator: Emulator, keyservice: Any, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Payments API` and `payments-api` slug alike under `{client_id}/{alias}`: the due-key plan
    (and the scan task, through the same index) refuses both before anything is stored, with no
    listing per rotation; a key rotated by hand into the place makes the other's reset fail at the
    sink's prepare, before its reset, so neither secret overwrites the other."""
    from rotator.engine import Engine
    from rotator.events import CapturePublisher
    from rotator.plan import plan_all_due
    from rotator.policy import Policy

    now = emulator.now()
    client = f"alias-{uuid.uuid4().hex[:6]}"
    emulator.add_client(client, created_at=now - 400 * 86_400, auto_key=False)
    one = emulator.add_key(client, "Payments API", created_at=now - 400 * 86_400).id
    two = emulator.add_key(client, "payments-api", created_at=now - 400 * 86_400).id
    own = emulator.add_key(client, "Payouts", created_at=now - 400 * 86_400).id
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    sink = registry.build("file", {"dir": str(tmp_path / "s"), "path": "{client_id}/{alias}.secret"}, FP)
    events = CapturePublisher()
    engine = Engine(keyservice, [sink], state, events, FP, Policy(), clients=[client])
    plan = {step.ref.key_id: step for step in plan_all_due(engine)}
    assert {k: s.action for k, s in plan.items()} == {one: "refuse", two: "refuse", own: "rotate"}
    assert "would also hold" in plan[one].why and emulator.ledger == []
    assert engine.rotate(KeyRef(client, own), trigger="manual").status == "succeeded"
    assert engine.rotate(KeyRef(client, one), trigger="manual").status == "succeeded"  # by hand, into the place
    result = engine.rotate(KeyRef(client, two), trigger="manual")
    assert result.status == "failed" and "another key" in result.reason
    assert [e.key_id for e in emulator.ledger] == [own, one]  # the second key was never reset


def test_the_scan_task_does_not_queue_keys_that_would_share_a_place(
    tmp_path: Path, emulator: Emulator, keyservice: Any, state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beat's scan maps every key's place first: the two colliding due keys get `rotation.failed`
    (each naming the other) and no message; the due key with a place of its own is queued."""
    import rotator.tasks as tasks
    from rotator.config import settings_from_mapping
    from rotator.engine import Engine
    from rotator.events import CapturePublisher
    from rotator.policy import Policy

    now = emulator.now()
    client = f"scan-{uuid.uuid4().hex[:6]}"
    emulator.add_client(client, created_at=now - 400 * 86_400, auto_key=False)
    one = emulator.add_key(client, "Payments API", created_at=now - 400 * 86_400).id
    two = emulator.add_key(client, "payments-api", created_at=now - 400 * 86_400).id
    own = emulator.add_key(client, "Payouts", created_at=now - 400 * 86_400).id
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("ROTATOR_KEYSERVICE_TOKEN", "x")
    monkeypatch.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    (tmp_path / "rotator.toml").write_text('[[sinks]]\nkind = "memory"\n')
    monkeypatch.setenv("ROTATOR_CONFIG", str(tmp_path / "rotator.toml"))  # Celery's own settings
    sink = registry.build("file", {"dir": str(tmp_path / "s"), "path": "{client_id}/{alias}.secret"}, FP)
    events = CapturePublisher()
    engine = Engine(keyservice, [sink], state, events, FP, Policy(), clients=[client])
    settings = settings_from_mapping({"sinks": [{"kind": "memory"}], "policy": {"mode": "enforce"},
                                      "keyservice": {"clients": [client]}, "celery": {"scan_every_s": 60}})
    queued: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tasks, "settings", lambda: settings)
    monkeypatch.setattr(tasks, "engine", lambda: engine)
    monkeypatch.setattr(tasks.rotate_key, "delay", lambda *args: queued.append(args))
    report = tasks.scan()
    assert report["queued"] == 1 and [a[1] for a in queued] == [own]
    failed = {e.key_id: e.error for e in events.events if e.name == "rotation.failed"}
    assert set(failed) == {one, two} and two in str(failed[one]) and one in str(failed[two])
    assert emulator.ledger == []


def test_apply_of_all_due_never_resets_a_key_its_plan_refused(
    place: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """`rotate --all-due --apply` with two keys whose aliases slug alike under `{alias}`: both are
    refused (exit 1) and written to the history, nothing is sent for them, and the key with a
    place of its own is rotated."""
    from rotator.cli import app

    now = emulator.now()
    client = f"apply-{uuid.uuid4().hex[:6]}"
    emulator.add_client(client, created_at=now - 400 * 86_400, auto_key=False)
    one = emulator.add_key(client, "Payments API", created_at=now - 400 * 86_400).id
    two = emulator.add_key(client, "payments-api", created_at=now - 400 * 86_400).id
    own = emulator.add_key(client, "Payouts", created_at=now - 400 * 86_400).id
    env.setenv("ROTATOR_STATE__NAMESPACE", f"apply-{uuid.uuid4().hex[:8]}")
    config = write_config(place / "rotator.toml", emulator_server.url, redis_server, clients=[client],
                          sinks=f'kind = "file"\ndir = "{place / "s"}"\npath = "{{client_id}}/{{alias}}.secret"')
    result = CliRunner().invoke(app, ["rotate", "--all-due", "--apply", "--json", "--config", str(config)])
    assert result.exit_code == 1, result.output
    outcome = {r["key_id"]: r["status"] for r in json.loads(result.stdout)["results"]}
    assert outcome == {one: "failed", two: "failed", own: "succeeded"}
    assert [e.key_id for e in emulator.ledger] == [own]
    history = CliRunner().invoke(app, ["status", "--history", "--json", "--config", str(config)])
    refused = {e["key_id"] for e in json.loads(history.stdout)["history"] if e.get("status") == "failed"}
    assert refused == {one, two}


def test_the_orphan_walk_neither_opens_a_planted_fifo_nor_follows_a_symlink(place: Path) -> None:
    """Reading a FIFO would block `reconcile` for ever; a symlink could point anywhere."""
    root = place / "secrets"
    sink = file_sink(root)
    sink.write(record(key()))
    os.mkfifo(root / "acme" / "planted.secret")
    (root / "acme" / "link.secret").symlink_to(place / "outside" / "victim")
    found: list[Any] = []
    walker = threading.Thread(target=lambda: found.extend(sink.stored_refs()), daemon=True)
    walker.start()
    walker.join(5)
    assert not walker.is_alive(), "the walk opened the FIFO"
    assert [(where.rsplit("/", 1)[-1], str(ref)) for where, ref in found] == [("key_1.secret", "acme/key_1")]
