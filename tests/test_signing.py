"""Signed task messages: only a trusted signer can order a reset or a notification through the broker.

The attacks of issue 21 against a real worker on a real Redis broker (the RabbitMQ ones are in
tests/test_rabbitmq.py), the rolling upgrade between signing modes, and the pieces underneath:
the envelope, the configuration checks and `rotator keys init`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rotator.config import config_warnings, settings_from_mapping
from rotator.errors import ConfigError
from rotator.keys import init_keys
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.signing import HEADER, Signer, Verifier, canonical, envelope, read_private_key
from rotator.state import RedisState
from tests.signed import local_signer, publishing_as
from tests.test_celery import DAY, Cluster, reset_counts, settled, wait_for
from tests.test_celery import vault as vault  # the fixture

HEADERS = {"task": "rotator.rotate_key", "id": "t-1", "eta": None, "expires": None, "retries": 0,
           "timelimit": (None, None)}
BODY = (["acme-prod", "key_1", "manual", "g1"], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                      "chord": None})


def _signer(name: str) -> Signer:
    return Signer(name, Ed25519PrivateKey.generate())


def _verifier(*signers: Signer, relays: tuple[str, ...] = (), max_age_s: float = 3600) -> Verifier:
    trusted: dict[str, tuple[Any, ...]] = {}
    for s in signers:
        trusted[s.name] = (*trusted.get(s.name, ()), s.key.public_key())
    return Verifier(trusted, frozenset(relays), max_age_s)


def _as_delivered(headers: dict[str, Any], body: Any) -> tuple[dict[str, Any], Any]:
    """What a worker decodes: JSON all the way through (tuples become lists)."""
    return json.loads(json.dumps(headers)), json.loads(json.dumps(body))


def test_the_envelope_covers_name_arguments_callbacks_and_eta() -> None:
    beat, alice = _signer("beat"), _signer("alice")
    verifier = _verifier(beat, alice, relays=("beat",))
    now = time.time()
    headers = {**HEADERS, HEADER: beat.stamp(HEADERS, BODY, "beat", now)}
    assert verifier.check(*_as_delivered(headers, BODY), now).actor == "beat"
    tampered: list[tuple[str, dict[str, Any], Any]] = [
        ("task", {**headers, "task": "rotator.notify"}, BODY),
        ("eta", {**headers, "eta": "2030-01-01T00:00:00+00:00"}, BODY),
        ("arguments", headers, (["acme-prod", "key_2", "manual", "g1"], {}, BODY[2])),
        ("kwargs", headers, (BODY[0], {"force": True, "include_out_of_scope": True}, BODY[2])),
        ("callbacks", headers, (BODY[0], {}, {**BODY[2], "callbacks": [{"task": "rotator.rotate_key"}]})),
    ]
    for what, h, b in tampered:
        assert verifier.check(*_as_delivered(h, b), now).reason == "bad_signature", what
    assert verifier.check(HEADERS, BODY, now).reason == "unsigned"
    assert verifier.check({**HEADERS, HEADER: "x"}, BODY, now).reason == "malformed"
    old = {**HEADERS, HEADER: beat.stamp(HEADERS, BODY, "beat", now - 7200)}
    assert verifier.check(old, BODY, now).reason == "expired"
    ahead = {**HEADERS, HEADER: beat.stamp(HEADERS, BODY, "beat", now + 3600)}
    assert verifier.check(ahead, BODY, now).reason == "not_yet_valid"
    mallory = _signer("mallory")
    assert verifier.check({**HEADERS, HEADER: mallory.stamp(HEADERS, BODY, "mallory", now)}, BODY,
                          now).reason == "unknown_signer"
    impostor = Signer("beat", Ed25519PrivateKey.generate())  # a trusted name, another key
    assert verifier.check({**HEADERS, HEADER: impostor.stamp(HEADERS, BODY, "beat", now)}, BODY,
                          now).reason == "bad_signature"
    # alice is trusted but no relay: she cannot sign a message on beat's behalf; beat can carry hers
    assert verifier.check({**HEADERS, HEADER: alice.stamp(HEADERS, BODY, "beat", now)}, BODY,
                          now).reason == "origin_not_relayed"
    assert verifier.check({**HEADERS, HEADER: beat.stamp(HEADERS, BODY, "alice", now)}, BODY, now).actor == "alice"


def test_a_signer_rolls_over_to_a_new_key_without_a_gap() -> None:
    old, new = _signer("worker-a"), Signer("worker-a", Ed25519PrivateKey.generate())
    now = time.time()
    both = _verifier(old, new)
    for s in (old, new):
        assert both.check({**HEADERS, HEADER: s.stamp(HEADERS, BODY, "worker-a", now)}, BODY, now).accepted
    assert not _verifier(new).check({**HEADERS, HEADER: old.stamp(HEADERS, BODY, "worker-a", now)}, BODY,
                                    now).accepted


def test_canonical_bytes_survive_the_json_round_trip() -> None:
    stamp = {"signer": "a", "origin": "a", "iat": 1.5, "mid": "m"}
    assert canonical(envelope(HEADERS, BODY, stamp)) == canonical(envelope(*_as_delivered(HEADERS, BODY), stamp))


def _settings(signing: dict[str, Any], **celery: Any) -> Any:
    data = {"keyservice": {"kind": "emulator"}, "engine": {"fingerprint_key_env": "FP"},
            "sinks": [{"kind": "memory"}], "signing": signing, "celery": celery}
    return settings_from_mapping(data, environ={"FP": "x" * 32})


def test_config_refuses_a_lifetime_shorter_than_redelivery_and_untrusted_relays(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings({"max_age_s": 3000, "relays": ["nobody"], "private_key_file": str(tmp_path / "missing.key")},
                  visibility_timeout_s=3600)
    text = "\n".join(str(p) for p in caught.value.problems)
    assert "signing.max_age_s: must be longer than celery.visibility_timeout_s (3600s" in text
    assert "signing.relays: 'nobody' is not in signing.trusted" in text
    assert "signing.private_key_file" in text and "rotator keys init" in text
    with pytest.raises(ConfigError) as caught:
        _settings({"trusted": {"beat": ["ed25519:bm90IGEga2V5"]}})
    assert "signer 'beat': not a base64 Ed25519 public key" in str(caught.value.problems[0])
    with pytest.raises(ConfigError) as caught:
        _settings({"trusted": {"beat": ["c3NoLWVkMjU1MTk="]}})
    assert "ed25519:<base64>" in str(caught.value.problems[0])
    off = config_warnings(_settings({"mode": "off"}), "f")
    assert any(w.key == "signing.mode" and "anyone who can write to the broker" in w.reason for w in off)
    assert not [w for w in config_warnings(_settings({}), "f") if w.key == "signing.mode"]


def test_keys_init_makes_private_files_keeps_them_and_prints_a_loadable_config(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    first = init_keys(directory, ["beat", "worker-a"], ("alice",))
    assert directory.stat().st_mode & 0o777 == 0o700
    for path in first.made:
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert set(first.public) == {"beat", "worker-a", "alice"} and first.relays == ["beat", "worker-a"]
    again = init_keys(directory, ["beat", "worker-a", "worker-b"])
    assert again.public["beat"] == first.public["beat"]  # kept, never replaced
    assert [p.name for p in again.made] == ["worker-b.ed25519"]
    config = tomllib.loads(again.config())
    (directory / "file.key").read_text()  # made with the fingerprint key
    settings = settings_from_mapping({"keyservice": {"kind": "emulator"}, "sinks": [{"kind": "memory"}],
                                      "signing": {**config["signing"], "name": "worker-b",
                                                  "private_key_file": str(again.signing_key("worker-b"))},
                                      "engine": config["engine"]}, environ={})
    from rotator.gate import make_signer, make_verifier

    me = make_signer(settings)
    assert me is not None and me.public() == again.public["worker-b"]
    stamp = me.stamp(HEADERS, BODY, "alice", time.time())  # a relay carries alice's retry
    assert make_verifier(settings, me).check({**HEADERS, HEADER: stamp}, BODY, time.time()).actor == "alice"
    (directory / "beat.ed25519").chmod(0o440)  # a Kubernetes Secret's group-readable mount is fine
    read_private_key(directory / "beat.ed25519")
    (directory / "beat.ed25519").chmod(0o644)
    with pytest.raises(Exception, match="open to other users"):
        read_private_key(directory / "beat.ed25519")


def test_keys_init_on_the_command_line_prints_public_keys_only(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "rotator.cli", "keys", "init", str(tmp_path / "k"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["public_keys"]) == {"beat", "worker"}
    for path in report["made"]:
        secret = Path(path).read_text().strip()
        body = secret.replace("-----BEGIN PRIVATE KEY-----", "").replace("-----END PRIVATE KEY-----", "").strip()
        assert body not in done.stdout + done.stderr


# --- the attacks, against a real worker on a real Redis broker ---------------------------------------


def _kombu_message(task: str, args: list[Any], kwargs: dict[str, Any], queue: str = "rotator",
                   embed: dict[str, Any] | None = None) -> bytes:
    """A task message made by hand, as an attacker LPUSHes it (kombu's Redis envelope, protocol 2)."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None,
                                      **(embed or {})}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                    "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "", "kwargsrepr": "",
                    "origin": "attacker"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}}).encode()


@pytest.fixture
def attacked(tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
             vault: Any) -> Any:
    from tests.receiver import Receiver

    now = emulator.now()
    client = emulator.add_client("acme-prod", "Acme", created_at=now - 400 * DAY)
    due1 = next(iter(client.keys))
    due2 = emulator.add_key("acme-prod", "payouts", created_at=now - 95 * DAY).id
    excluded = emulator.add_key("acme-prod", "legacy", created_at=now - 200 * DAY).id
    sandbox_client = emulator.add_client("acme-sbx", "Acme sandbox", created_at=now - 400 * DAY,
                                         environment="SANDBOX")
    sandbox = next(iter(sandbox_client.keys))
    alice = _signer("alice")
    with Receiver() as receiver:
        cluster = Cluster(tmp_path, redis_server, emulator_server.url, vault.url, vault.root_token,
                          policy=f'exclude = ["acme-prod/{excluded}"]', extra=f"""
[[alerts]]
url = "webhook+{receiver.url}/hook"
secret_env = "HOOK_SECRET"

[signing]
[signing.trusted]
alice = ["{alice.public()}"]
""")
        try:
            yield cluster, receiver, alice, {"due1": due1, "due2": due2, "excluded": excluded, "sandbox": sandbox}
        finally:
            cluster.stop()


def test_no_forged_message_resets_a_key_or_sends_an_alert(
    attacked: Any, emulator: Emulator, keyservice: HttpKeyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21's attacks with a worker running: a hand-made LPUSH for a SANDBOX key with force,
    include_out_of_scope and an invented actor; the same for an excluded key through Celery; a
    `rotator.notify` asking for a correctly signed webhook with any text; a captured signed message
    with other arguments, an added callback or a later eta; another key under a trusted name; an
    unknown signer; a message two days old; a trusted operator signing in another's name; and the
    replay of a consumed message. None resets anything or reaches the webhook; each is counted and
    logged once, one `security.forged_message` alert goes out; then alice's signed message and the
    CLI's `rotate --enqueue` still rotate, recorded under their signers, not the actor they claim.
    A body embedding a stamp of its own (Celery would merge it into the running task's request) and
    a task name no worker has are refused too, and that name's free text is logged nowhere."""
    cluster, receiver, alice, keys = attacked
    cluster.worker()
    from celery import Celery

    app = Celery(broker=cluster.broker_url)
    app.conf.task_default_queue = "rotator"
    claimed = {"force": True, "include_out_of_scope": True, "actor": "ceo-forged-actor", "reason": "PAY-ATTACKER"}
    conn = cluster.db.connection_pool.connection_kwargs
    broker = redis.Redis(host=conn["host"], port=conn["port"], db=1)
    broker.lpush("rotator", _kombu_message("rotator.rotate_key", ["acme-sbx", keys["sandbox"]], claimed))
    forged_event = {"event": "rotation.succeeded", "severity": "info", "client_id": "acme-prod", "key_id": "x",
                    "error": "PAY-ATTACKER: wire the float to account 666"}
    me = local_signer()

    def send(key: str, **options: Any) -> None:
        app.send_task("rotator.rotate_key", args=["acme-prod", key], kwargs=claimed, **options)

    with publishing_as(None):
        send(keys["excluded"])
        app.send_task("rotator.notify", args=[0, forged_event])
    with publishing_as(me, tamper=lambda h, b: b[0].__setitem__(1, keys["excluded"])):
        send(keys["due1"])
    with publishing_as(me, tamper=lambda h, b: b[2].__setitem__("callbacks", [{"task": "rotator.rotate_key"}])):
        send(keys["due1"])
    with publishing_as(me, tamper=lambda h, b: h.__setitem__("eta", "2020-01-01T00:00:00+00:00")):
        send(keys["due1"])
    with publishing_as(Signer(me.name, Ed25519PrivateKey.generate())):
        send(keys["excluded"])
    with publishing_as(_signer("mallory")):
        send(keys["excluded"])
    with publishing_as(me, issued_at=time.time() - 2 * DAY):
        send(keys["excluded"])
    with publishing_as(alice, origin=me.name):
        send(keys["excluded"])
    # alice signs as herself but embeds a stamp naming someone else (Celery merges the embed into the
    # running task's request); the same unsigned; a task name no worker has, quoting free text
    forged_stamp = {"v": 1, "signer": "alice", "origin": "ceo-forged-actor", "iat": time.time(), "mid": "m",
                    "sig": "x"}
    with publishing_as(alice, prepare=lambda h, b: b[2].update(rotator_signature=forged_stamp)):
        send(keys["due2"])
    broker.lpush("rotator", _kombu_message("rotator.rotate_key", ["acme-prod", keys["sandbox"]], {},
                                           embed={"rotator_signature": forged_stamp, "called_directly": True}))
    broker.lpush("rotator", _kombu_message("rotator.rotate_keys", ["PAY-ATTACKER"], claimed))
    state = RedisState.from_url(f"redis://{conn['host']}:{conn['port']}/0")
    expected = {"unsigned": 3, "bad_signature": 4, "unknown_signer": 1, "expired": 1, "origin_not_relayed": 1,
                "malformed": 2, "unknown_task": 1}
    wait_for(lambda: state.refused() == expected, 30, f"the refusals (so far {state.refused()})")

    # alice's own message for due1 runs under her name; the same message again is a replay
    task_id = str(uuid.uuid4())
    seen = str(keyservice.get_key("acme-prod", keys["due1"]).generation)
    with publishing_as(alice, same_stamp=True):
        app.send_task("rotator.rotate_key", args=["acme-prod", keys["due1"], "manual", seen],
                      kwargs={"actor": "alice-claims-ceo"}, task_id=task_id)
        wait_for(lambda: settled(cluster, emulator, keyservice, [keys["due1"]]), 45, "alice's rotation")
        time.sleep(0.5)  # acknowledged after its result is stored
        app.send_task("rotator.rotate_key", args=["acme-prod", keys["due1"], "manual", seen],
                      kwargs={"actor": "alice-claims-ceo"}, task_id=task_id)
    wait_for(lambda: state.refused().get("replayed") == 1, 20, "the replay's refusal")

    sent = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys["due2"], "--apply", "--enqueue")
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: settled(cluster, emulator, keyservice, [keys["due2"]]), 45, "the enqueued rotation")
    wait_for(lambda: {keys["due1"], keys["due2"]} <= {h["key_id"] for h in state.history(100)
                                                      if h.get("kind") == "rotation"},
             15, "both rotations in the history (written after the read-back)")
    assert reset_counts(emulator) == {keys["due1"]: 1, keys["due2"]: 1}  # nothing else was ever reset

    rotations = {h["key_id"]: h for h in state.history(100) if h.get("kind") == "rotation"}
    [enqueued] = [h for h in state.history(100) if h.get("action") == "enqueue"]
    assert enqueued["actor"] == me.name  # the CLI's own entry names the signer too
    assert rotations[keys["due1"]]["actor"] == "alice"  # not the actor her message claims
    assert "alice-claims-ceo" not in json.dumps(state.history(100))
    assert rotations[keys["due2"]]["actor"] == me.name
    alerts = receiver.wait_for(1, timeout=30)
    time.sleep(2)
    forged = [r.json() for r in receiver.received if r.json()["event"] == "security.forged_message"]
    assert len(forged) == 1 and forged[0]["details"]["reason"] in expected, forged
    assert alerts
    worker_log = cluster.outputs[0].read_text()
    refusals = [json.loads(line) for line in worker_log.splitlines()
                if line.startswith("{") and '"message.refused"' in line]
    assert len(refusals) == sum(expected.values()) + 1  # each refusal logged once
    written = cluster.everything_written() + "".join(r.body.decode() for r in receiver.received)
    for claim in ("ceo-forged-actor", "PAY-ATTACKER", "wire the float"):  # no refused message's free text
        assert claim not in written, claim

    for name in ("ROTATOR_KEYSERVICE_TOKEN", "ROTATOR_FINGERPRINT_KEY", "ROTATOR_IDEMPOTENCY_KEY", "HOOK_SECRET"):
        monkeypatch.setenv(name, cluster.env[name])
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from rotator.config import load_settings
    from rotator.metrics import RotatorCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RotatorCollector(load_settings(cluster.config), state))
    scraped = generate_latest(registry).decode()
    assert 'rotator_messages_refused_total{reason="unsigned"} 3.0' in scraped
    assert 'rotator_messages_refused_total{reason="replayed"} 1.0' in scraped


def _two_fleets(tmp_path: Path, redis_server: str, emulator_server: EmulatorServer, vault: Any,
                modes: tuple[str, str]) -> tuple[Cluster, Cluster]:
    """Two workers on one Redis, each on its own queue with its own `signing.mode`."""
    clusters = []
    for mode in modes:
        home = tmp_path / mode
        home.mkdir()
        broker = f'broker_url = "{redis_server}/1"\nqueue = "q-{mode}"'
        clusters.append(Cluster(home, redis_server, emulator_server.url, vault.url, vault.root_token, broker=broker,
                                extra=f'[signing]\nmode = "{mode}"\n'))
    return clusters[0], clusters[1]


def test_a_rolling_upgrade_what_each_mode_accepts_and_refuses(
    tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer, vault: Any,
    keyservice: HttpKeyService,
) -> None:
    """An older worker or publisher behaves as `signing.mode = "off"`: no stamp, no check. During
    an upgrade, a `transition` worker runs an older publisher's unsigned message (recorded under no
    claimed actor, counted) yet still refuses a badly signed one; an older (`off`) worker runs a
    newer publisher's signed message (the extra header means nothing to it). An `enforce` worker
    refuses the unsigned one (test_no_forged_message_resets_a_key_or_sends_an_alert)."""
    now = emulator.now()
    client = emulator.add_client("acme-prod", "Acme", created_at=now - 400 * DAY)
    k1 = next(iter(client.keys))
    k2 = emulator.add_key("acme-prod", "payouts", created_at=now - 95 * DAY).id
    transition, old = _two_fleets(tmp_path, redis_server, emulator_server, vault, ("transition", "off"))
    try:
        transition.worker()
        old.worker()
        from celery import Celery

        app = Celery(broker=transition.broker_url)
        seen1 = str(keyservice.get_key("acme-prod", k1).generation)
        seen2 = str(keyservice.get_key("acme-prod", k2).generation)
        with publishing_as(local_signer(), tamper=lambda h, b: b[0].__setitem__(1, k2)):
            app.send_task("rotator.rotate_key", args=["acme-prod", k1, "manual", seen1], queue="q-transition")
        with publishing_as(None):  # an older publisher
            app.send_task("rotator.rotate_key", args=["acme-prod", k1, "manual", seen1],
                          kwargs={"actor": "ceo-forged-actor"}, queue="q-transition")
        state = RedisState.from_url(f"{redis_server}/0")
        wait_for(lambda: settled(transition, emulator, keyservice, [k1]), 45, "the unsigned message's rotation")
        assert state.refused() == {"bad_signature": 1} and state.unsigned_accepted() == 1
        with publishing_as(local_signer()):  # a newer publisher, an older worker
            app.send_task("rotator.rotate_key", args=["acme-prod", k2, "manual", seen2], queue="q-off")
        wait_for(lambda: settled(old, emulator, keyservice, [k2]), 45, "the signed message's rotation")
        assert reset_counts(emulator) == {k1: 1, k2: 1}

        def actors() -> dict[str, str]:
            return {h["key_id"]: h["actor"] for h in state.history(20) if h.get("kind") == "rotation"}

        # The audit entry follows the sinks' read-back that `settled` sees: wait for it too.
        wait_for(lambda: len(actors()) == 2, 15, "both rotations in the history")
        assert actors() == {k1: "unsigned-message", k2: "unsigned-message"}
        lines = transition.outputs[0].read_text()
        assert '"message.unsigned_accepted"' in lines and '"reason": "bad_signature"' in lines
        assert '"signing.off"' in old.outputs[0].read_text()  # the older-worker stand-in says what it is
    finally:
        transition.stop()
        old.stop()


def test_a_process_with_an_unreadable_key_refuses_to_start(tmp_path: Path, redis_server: str) -> None:
    key = tmp_path / "beat.ed25519"
    key.write_text("not a key")
    key.chmod(0o600)
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keyservice]\nkind = "emulator"\n[state]\nredis_url = "{redis_server}/0"\n'
                      f'[celery]\nbroker_url = "{redis_server}/1"\n[engine]\nfingerprint_key_env = "FP"\n'
                      f'[[sinks]]\nkind = "memory"\n[signing]\nprivate_key_file = "{key}"\n')
    env = {**os.environ, "FP": "x" * 32}
    done = subprocess.run([sys.executable, "-m", "rotator.cli", "worker", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    # Found when the configuration is read (check-config says the same), before anything starts.
    assert re.search(r"signing\.private_key_file: .*beat\.ed25519 is not an unencrypted PEM private key",
                     done.stderr), done.stderr


class _Delivered:
    """What the gate reads of a delivered message: headers, the decoded body, the delivery info."""

    def __init__(self, headers: dict[str, Any], body: Any, redelivered: bool = False) -> None:
        self.headers, self._body = _as_delivered(headers, body)
        self.delivery_info = {"redelivered": redelivered}

    def decode(self) -> Any:
        return self._body


def test_a_consumed_message_is_never_run_again_even_when_rabbitmq_says_redelivered(redis_server: str) -> None:
    """RabbitMQ sets `redelivered` itself, but a client that may consume can take a copy and requeue
    it to get the flag: a consumed id stays refused (quietly, as `already_done`, when the broker
    marks it redelivered: RabbitMQ drops an acknowledgement sent past its consumer_timeout)."""
    from rotator.gate import Gate

    me = _signer("worker-a")
    settings = _settings({}, broker_url="amqp://rotator@127.0.0.1:5672/rotator")
    state = RedisState.from_url(f"{redis_server}/0", "gate-test")
    gate = Gate(settings, me, state)
    headers = {**HEADERS, HEADER: me.stamp(HEADERS, BODY, me.name, time.time())}
    first = gate.admit(_Delivered(headers, BODY))
    assert first.accepted
    gate.consumed(first.mid)
    assert gate.admit(_Delivered(headers, BODY)).reason == "replayed"
    assert gate.admit(_Delivered(headers, BODY, redelivered=True)).reason == "already_done"
    embedded = (BODY[0], BODY[1], {**BODY[2], HEADER: {"origin": "ceo"}})
    signed_embed = {**HEADERS, HEADER: me.stamp(HEADERS, embedded, me.name, time.time())}
    assert gate.admit(_Delivered(signed_embed, embedded)).reason == "malformed"


def test_a_message_that_cannot_be_signed_is_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signing happens in the sender itself, not in a signal handler (whose error Celery swallows):
    a publisher whose key fails sends nothing and says so."""
    from celery import Celery

    import rotator.gate as gate

    app = Celery("t", broker="memory://", amqp="rotator.gate:SignedAMQP")

    def broken() -> Signer:
        raise OSError("the key file went away")

    monkeypatch.setattr(gate, "signer", broken)
    with pytest.raises(OSError, match="went away"):
        app.send_task("rotator.rotate_key", args=["acme-prod", "key_1"])
    monkeypatch.setattr(gate, "signer", lambda: _signer("beat"))
    with app.connection_for_write() as conn, conn.SimpleQueue("celery") as queue:
        app.send_task("rotator.rotate_key", args=["acme-prod", "key_1"])
        assert queue.get(timeout=5).headers[HEADER]["signer"] == "beat"


def test_the_lifetime_covers_the_longest_retry_wait() -> None:
    with pytest.raises(ConfigError, match=r"longest retry wait \(1000s\)"):
        settings_from_mapping({"keyservice": {"kind": "emulator"}, "engine": {"fingerprint_key_env": "FP"},
                               "sinks": [{"kind": "memory"}], "state": {"lock_ttl_s": 3000},
                               "signing": {"max_age_s": 4500}}, environ={"FP": "x" * 32})
