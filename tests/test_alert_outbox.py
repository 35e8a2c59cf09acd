"""Critical alerts without the broker: real Celery workers, a broker Redis (and a state Redis)
that die mid-rotation, a Vault API whose writes fail, and a real HTTP receiver."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rotator.alerts.dispatch import Route
from rotator.alerts.outbox import Deliverer, Outbox
from rotator.config import AlertConfig
from rotator.embedded import PrivateRedis
from rotator.errors import TransientError
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.protocols import Event
from tests.receiver import Receiver
from tests.test_celery import DAY, Cluster, wait_for
from tests.vault_server import VaultTestServer

AT_RISK = "rotation.secret_at_risk"


def at_risk(received: list) -> list:  # type: ignore[type-arg]
    return [r for r in list(received) if r.json()["event"] == AT_RISK]


@pytest.mark.slow
@pytest.mark.parametrize("redis_too", [False, True], ids=["broker-down", "broker-and-redis-down"])
def test_an_at_risk_alert_reaches_the_receiver_with_the_broker_down_even_after_a_restart(
    tmp_path: Path, emulator: Emulator, emulator_server: EmulatorServer, redis_too: bool,
) -> None:
    """The broker (and, in one case, the state Redis) dies while a worker holds a new secret it
    cannot store: the worker delivers the at-risk alert itself. The receiver is down at first;
    the worker is killed with the alert still pending; a new worker, started with the broker
    still down, delivers it: the same event, with the same webhook id."""
    key_id = next(iter(emulator.add_client("acme-prod", created_at=emulator.now() - 400 * DAY).keys))
    with PrivateRedis() as broker, PrivateRedis() as state, VaultTestServer() as vault, Receiver() as receiver:
        cluster = Cluster(tmp_path, state.url, emulator_server.url, vault.url, vault.root_token, sink_retry_s=2,
                          broker=f'broker_url = "{broker.url}/1"', extra=f"""
[[alerts]]
url = "webhook+{receiver.url}/hook"
secret_env = "HOOK_SECRET"
events = ["{AT_RISK}"]
""")
        receiver.answers = [503] * 10_000  # down until told otherwise
        try:
            first = cluster.worker()
            vault.state.hold_writes.clear()  # the worker is caught holding the new secret
            enqueued = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", key_id, "--apply", "--enqueue")
            assert enqueued.returncode == 0, enqueued.stderr
            wait_for(lambda: ("POST", f"secret/data/rotator/acme-prod/{key_id}") in vault.state.requests, 30,
                     "the Vault write")
            broker.stop()
            if redis_too:
                state.stop()
            vault.state.fail_data_writes = 10_000
            vault.state.hold_writes.set()
            wait_for(lambda: bool(at_risk(receiver.attempts)), 60, "a first delivery try")
            assert not at_risk(receiver.received)
            cluster.kill(first)

            receiver.answers = []
            cluster.start("worker", "--loglevel", "DEBUG")  # the broker is still down
            wait_for(lambda: bool(at_risk(receiver.received)), 60, "the pending alert to be delivered")
            got = at_risk(receiver.received)
            assert len(got) == 1 and got[0].json()["key_id"] == key_id
            assert {a.headers["webhook-id"] for a in at_risk(receiver.attempts)} == {got[0].headers["webhook-id"]}
            outbox = tmp_path / "outbox" / "alert-outbox-rotator.jsonl"
            wait_for(lambda: outbox.read_text() == "", 10, "the outbox to be emptied")
            secret = emulator.current_secret("acme-prod", key_id)
            written = "".join(p.read_text(errors="replace") for p in cluster.outputs if p.exists())
            assert secret not in written + "".join(a.body.decode() for a in receiver.attempts)
        finally:
            vault.state.hold_writes.set()
            cluster.stop()


def test_the_outbox_keeps_what_was_not_delivered_and_delivers_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry stays until its channel takes it (a torn line from a crash is skipped); it is
    delivered once however many deliverers share the state directory; the file is emptied after."""
    with Receiver() as receiver:
        receiver.answers = [503, 503]
        monkeypatch.setenv("HOOK_SECRET", "hook-secret-1")
        route = Route(0, AlertConfig(url=f"webhook+{receiver.url}/hook", secret_env="HOOK_SECRET"))
        box = Outbox(tmp_path / "outbox.jsonl")
        event = Event(AT_RISK, "critical", "acme", "k1", attempt_id="a1", time=1.0, details={"time_left_s": 10})
        ident = box.add(0, event)
        with box.path.open("a") as torn:
            torn.write('{"id": "torn-by-a-cras')
        assert [p.id for p in box.pending()] == [ident]
        now = [0.0]
        one = Deliverer(box, [route], lambda: None, clock=lambda: now[0])
        other = Deliverer(box, [route], lambda: None, clock=lambda: now[0])
        assert one.holds_the_lock() and not other.holds_the_lock()
        assert one.deliver_due() == 0 and one.deliver_due() == 0  # 503, then waiting out its back-off
        now[0] += 2.5
        assert one.deliver_due() == 0
        now[0] += 4.5
        assert one.deliver_due() == 1 and box.pending() == [] and box.path.read_text() == ""
        assert len(receiver.received) == 1 and len(receiver.attempts) == 3
        assert receiver.received[0].json() == event.to_dict()
        assert len({a.headers["webhook-id"] for a in receiver.attempts}) == 1


def test_a_transient_failure_is_retried_and_a_refusal_is_not(tmp_path: Path) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def send(self, event: Event) -> None:
            self.calls += 1
            raise TransientError("down")

    flaky = Flaky()

    class FlakyRoute(Route):
        def notifier(self):  # type: ignore[no-untyped-def]
            return flaky

    box = Outbox(tmp_path / "outbox.jsonl")
    box.add(0, Event(AT_RISK, "critical", "acme", "k1", time=time.time()))
    deliverer = Deliverer(box, [FlakyRoute(0, AlertConfig(url="json://127.0.0.1:9/x"))], lambda: None)
    deliverer.deliver_due()
    assert flaky.calls == 1 and len(box.pending()) == 1
    assert json.loads(box.path.read_text().splitlines()[0])["event"]["event"] == AT_RISK


def test_a_slow_dead_channel_holds_back_neither_another_channel_nor_its_own_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channel 0 hangs and fails with ten alerts pending; channel 1 answers. One pass tries channel
    0 once (it backs off as a whole), channel 1's alert goes out in it, and the same event
    pending twice is sent once."""
    monkeypatch.setenv("HOOK_SECRET", "hook-secret-1")
    with Receiver() as dead, Receiver() as alive:
        dead.hang_s, dead.answers = 1.0, [503] * 100
        routes = [Route(i, AlertConfig(url=f"webhook+{r.url}/hook", secret_env="HOOK_SECRET"))
                  for i, r in enumerate((dead, alive))]
        box = Outbox(tmp_path / "outbox.jsonl")
        for n in range(10):
            box.add(0, Event(AT_RISK, "critical", "acme", f"k{n}", attempt_id="a", time=float(n)))
        urgent = Event(AT_RISK, "critical", "acme", "k-urgent", attempt_id="b", time=99.0)
        box.add(1, urgent)
        box.add(1, Event(AT_RISK, "critical", "acme", "k-urgent", attempt_id="b", time=100.0))  # told again
        deliverer = Deliverer(box, routes, lambda: None)
        began = time.monotonic()
        assert deliverer.deliver_due() == 2  # channel 1's alert, and its duplicate settled unsent
        assert time.monotonic() - began < 2.5 and len(dead.attempts) == 1
        assert [r.json()["key_id"] for r in alive.received] == ["k-urgent"]
        assert len(box.pending()) == 10


def test_a_long_outage_keeps_the_file_to_what_is_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one channel stays down, the entries the others took are dropped from the file once
    it grows past its limit; what is pending stays, in order."""
    box = Outbox(tmp_path / "outbox.jsonl")
    kept = box.add(0, Event(AT_RISK, "critical", "acme", "k-stuck", time=1.0))
    for n in range(200):
        box.done(box.add(1, Event(AT_RISK, "critical", "acme", f"k{n}", time=float(n))), "sent")
    size = box.path.stat().st_size
    box.compact(rewrite_at_bytes=size // 2)
    assert [p.id for p in box.pending()] == [kept] and box.path.stat().st_size < 1_000
    box.compact(rewrite_at_bytes=size // 2)
    assert [p.id for p in box.pending()] == [kept]


@pytest.mark.slow
def test_a_cli_run_that_cannot_reach_the_broker_delivers_its_critical_alert_itself(
    tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
) -> None:
    """`rotate --apply` leaves a secret at risk (Vault takes no write) while the broker is down: the
    CLI process delivers the at-risk alert itself; the secret is in no line it prints."""
    key_id = next(iter(emulator.add_client("acme-prod", created_at=emulator.now() - 400 * DAY).keys))
    with VaultTestServer() as vault, Receiver() as receiver:
        cluster = Cluster(tmp_path, redis_server, emulator_server.url, vault.url, vault.root_token, sink_retry_s=1,
                          broker='broker_url = "redis://127.0.0.1:1/1"', extra=f"""
[[alerts]]
url = "webhook+{receiver.url}/hook"
secret_env = "HOOK_SECRET"
events = ["{AT_RISK}"]
""")
        vault.state.fail_data_writes = 1_000
        try:
            done = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", key_id, "--apply", "--json")
            assert json.loads(done.stdout)["results"][0]["status"] == "at_risk", done.stdout + done.stderr
            got = at_risk(receiver.received)
            assert [g.json()["key_id"] for g in got] == [key_id]
            assert "alert.broker_unreachable" in done.stderr
            assert emulator.current_secret("acme-prod", key_id) not in done.stdout + done.stderr
        finally:
            cluster.stop()


def test_repeats_of_an_alert_pending_for_a_channel_that_is_down_are_settled_at_once(tmp_path: Path) -> None:
    """A sweep every few minutes tells the same at-risk secret again while its channel is down:
    the repeats are settled as duplicates of the pending one, so the file holds one per event."""
    class Down:
        def send(self, event: Event) -> None:
            raise TransientError("down")

    class DownRoute(Route):
        def notifier(self):  # type: ignore[no-untyped-def]
            return Down()

    box = Outbox(tmp_path / "outbox.jsonl")
    deliverer = Deliverer(box, [DownRoute(0, AlertConfig(url="json://127.0.0.1:9/x"))], lambda: None)
    for sweep in range(50):
        box.add(0, Event(AT_RISK, "critical", "acme", "k1", attempt_id="a", time=float(sweep),
                         details={"time_left_s": 80_000 - sweep}))
        deliverer.deliver_due()
    assert len(box.pending()) == 1 and deliverer.tries == {"0": 1}


def test_an_outbox_directory_others_can_write_is_a_configuration_error(tmp_path: Path) -> None:
    from rotator.config import ConfigError, settings_from_mapping

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    base = {"keyservice": {"kind": "emulator"}, "sinks": [{"kind": "memory"}]}
    env = {"ROTATOR_FINGERPRINT_KEY": "f" * 32}
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({**base, "celery": {"alert_outbox_dir": str(shared)}}, environ=env)
    assert [p.key for p in info.value.problems] == ["celery.alert_outbox_dir"]
    shared.chmod(0o700)
    assert settings_from_mapping({**base, "celery": {"alert_outbox_dir": str(shared)}}, environ=env)
