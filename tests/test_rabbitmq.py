"""Real Celery worker and beat on RabbitMQ (127.0.0.1:5672, guest), the emulator and Vault over HTTP.

Each run gets a private vhost (made and deleted with rabbitmqctl) so no stale message or queue of
another run can interfere; without rabbitmqctl the default vhost is used with a queue name of the
run's own, deleted afterwards. Skipped when nothing listens on 127.0.0.1:5672.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from tests.signed import local_signer, publishing_as
from tests.test_celery import DAY, Cluster, reset_counts, settled, wait_for
from tests.vault_server import VaultTestServer

HOST, PORT = "127.0.0.1", 5672
LOCK = Path("/tmp/rotator-tests-rabbitmq.lock")
SAVED = Path("/tmp/rotator-tests-rabbitmq-settings.json")  # the broker's values while a test changes them
PASSWORD_ENV = "ROTATOR_TEST_RABBITMQ_PASSWORD"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _listening(HOST, PORT), reason=f"no RabbitMQ listening on {HOST}:{PORT}"),
]


@dataclass(frozen=True)
class Rabbit:
    vhost: str
    queue: str
    private: bool  # a vhost of this run's own (rabbitmqctl), not the default one

    @property
    def url(self) -> str:
        """The broker URL of a config: user only, the password comes from `password_env`."""
        return f"amqp://guest@{HOST}:{PORT}/{self.vhost}"

    def ctl(self, *args: str) -> str:
        result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def broker_lines(self, queue: str | None = None, quorum: bool = False) -> str:
        return (f'broker_url = "{self.url}"\npassword_env = "{PASSWORD_ENV}"\nqueue = "{queue or self.queue}"\n'
                f"quorum_queues = {'true' if quorum else 'false'}")


def _ctl(*args: str) -> bool:
    try:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def broker_to_ourselves() -> Iterator[None]:
    """The machine's broker is shared by every test run on it, and one test here changes a
    broker-wide setting: runs take these tests in turn (an exclusive lock on a file beside it)."""
    import fcntl
    import os

    fd = os.open(LOCK, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only suffices for flock, whoever made it
    with os.fdopen(fd) as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another test run held the RabbitMQ tests' lock for 15 minutes")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def rabbit(broker_to_ourselves: None) -> Iterator[Rabbit]:
    run = uuid.uuid4().hex[:10]
    vhost = f"rotator-test-{run}"
    if shutil.which("rabbitmqctl") and _ctl("add_vhost", vhost):
        try:
            assert _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"), "rabbitmqctl set_permissions"
            yield Rabbit(vhost, "rotator", private=True)
        finally:
            _ctl("delete_vhost", vhost)
        return
    rabbit = Rabbit("/", f"rotator-test-{run}", private=False)
    try:
        yield rabbit
    finally:
        from kombu import Connection

        with Connection(f"amqp://guest:guest@{HOST}:{PORT}//", connect_timeout=3) as conn:
            channel = conn.channel()
            for queue in (rabbit.queue, f"{rabbit.queue}-q"):
                for delete in (channel.queue_delete, channel.exchange_delete):
                    try:
                        delete(queue)
                    except Exception:  # absent is fine; a failed delete closes the channel
                        channel = conn.channel()


@pytest.fixture
def vault() -> Iterator[VaultTestServer]:
    with VaultTestServer() as server:
        yield server


def due_keys(emulator: Emulator) -> list[str]:
    now = emulator.now()
    client = emulator.add_client("acme-prod", "Acme", created_at=now - 400 * DAY)
    due = [next(iter(client.keys)), emulator.add_key("acme-prod", "payouts", created_at=now - 95 * DAY).id]
    emulator.add_key("acme-prod", "reports", created_at=now - 10 * DAY)
    return due


def rabbit_cluster(tmp: Path, rabbit: Rabbit, redis_server: str, emulator_server: EmulatorServer,
                   vault: VaultTestServer, queue: str | None = None, quorum: bool = False) -> Cluster:
    cluster = Cluster(tmp, redis_server, emulator_server.url, vault.url, vault.root_token,
                      broker=rabbit.broker_lines(queue, quorum))
    cluster.env[PASSWORD_ENV] = "guest"
    return cluster


def test_worker_and_beat_rotate_every_due_key_once_over_rabbitmq(
    tmp_path: Path, rabbit: Rabbit, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    vault: VaultTestServer, keyservice: HttpKeyService,
) -> None:
    """check-config --ping reaches RabbitMQ; beat's scan goes through RabbitMQ to a worker, which
    resets each due key once and stores the secret in both sinks; no message sits in Redis."""
    keys = due_keys(emulator)
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault)
    try:
        check = cluster.cli("check-config", "--ping")
        assert check.returncode == 0, check.stderr
        assert "ok   celery broker" in check.stderr and "warning" not in check.stderr, check.stderr
        worker = cluster.worker()
        banner = cluster.outputs[-1].read_text()
        assert f"amqp://guest:**@{HOST}:{PORT}/" in banner and "guest:guest" not in banner
        cluster.start("beat", "--schedule", str(tmp_path / "beat"))
        wait_for(lambda: settled(cluster, emulator, keyservice, keys), 45, "both keys rotated and stored")
        time.sleep(2.5)  # one more beat interval: nothing is rotated again
        assert reset_counts(emulator) == {keys[0]: 1, keys[1]: 1}
        assert settled(cluster, emulator, keyservice, keys)
        assert worker.poll() is None
        probe = cluster.cli("health", "--worker")  # the broadcast ping crosses RabbitMQ too
        assert probe.returncode == 0 and "ok   celery broker" in probe.stderr, probe.stderr
        assert "ok   worker celery@" in probe.stderr, probe.stderr
        # The messages went through RabbitMQ: Redis holds rotator's state (database 0) and nothing else.
        assert list(cluster.db.info("keyspace")) == ["db0"]
        written = cluster.everything_written()
        assert "rotation.succeeded" in written
        for key_id in keys:
            assert emulator.current_secret("acme-prod", key_id) not in written
    finally:
        cluster.stop()


def test_quorum_queue_with_busy_retries_through_native_delayed_delivery(
    tmp_path: Path, rabbit: Rabbit, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    vault: VaultTestServer, keyservice: HttpKeyService,
) -> None:
    """`quorum_queues = true`: `rotate --enqueue` publishes to a quorum queue on a topic exchange,
    the worker drops global QoS, and a duplicate message that finds the key leased is retried with
    a countdown (waiting in RabbitMQ's delayed-delivery queues, not in the worker) and then skipped:
    one reset."""
    if not rabbit.private:
        pytest.skip("needs a private vhost (rabbitmqctl): delayed-delivery queues are shared per vhost")
    keys = due_keys(emulator)
    queue = f"{rabbit.queue}-q"
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault, queue=queue, quorum=True)
    try:
        vault.state.hold_writes.clear()  # the first rotation holds the key's lease until released
        cluster.worker()
        from celery import Celery

        app = Celery(broker=f"amqp://guest:guest@{HOST}:{PORT}/{rabbit.vhost}")
        app.conf.update(task_default_queue=queue, task_default_queue_type="quorum",
                        task_default_exchange_type="topic", broker_transport_options={"confirm_publish": True})
        seen = str(keyservice.get_key("acme-prod", keys[0]).generation)
        enqueued = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys[0], "--apply", "--enqueue")
        assert enqueued.returncode == 0, enqueued.stderr  # rotator's own publisher, confirms on
        wait_for(lambda: len(emulator.ledger) == 1, 30, "the reset")
        with publishing_as(local_signer()):
            app.send_task("rotator.rotate_key", args=["acme-prod", keys[0], "schedule", seen])  # a duplicate
        worker_log = cluster.outputs[0]
        retry = re.compile(rb"Task rotator\.rotate_key\[([0-9a-f-]+)\] retry: Retry in")
        wait_for(lambda: retry.search(worker_log.read_bytes()) is not None, 30, "the duplicate to be retried")
        retried_at = time.monotonic()
        match = retry.search(worker_log.read_bytes())
        assert match is not None and len(emulator.ledger) == 1
        vault.state.hold_writes.set()
        # The retry (countdown lock_ttl_s / 3, about 3 s) waits in RabbitMQ's delayed-delivery queues,
        # not in the worker: the worker receives the message again only once the countdown is over.
        received = b"Task rotator.rotate_key[" + match.group(1) + b"] received"
        wait_for(lambda: worker_log.read_bytes().count(received) == 2, 30, "the retried message")
        assert time.monotonic() - retried_at >= 2.0
        wait_for(lambda: settled(cluster, emulator, keyservice, [keys[0]]), 45, "the rotation to be stored")
        wait_for(lambda: worker_log.read_bytes().count(b"succeeded in") >= 3, 20,
                 "the retried duplicate to finish (recover, rotation, duplicate)")
        assert reset_counts(emulator) == {keys[0]: 1}
        log = worker_log.read_text()
        assert "Global QoS is disabled" in log
        assert "Direct exchanges are not supported" not in log
        queues = dict(line.split("\t")[:2] for line in rabbit.ctl("list_queues", "-p", rabbit.vhost, "name", "type")
                      .splitlines() if "\t" in line)
        assert queues[queue] == "quorum" and queues.get("celery_delayed_0") == "quorum", queues
        exchanges = dict(line.split("\t")[:2] for line in rabbit.ctl("list_exchanges", "-p", rabbit.vhost, "name",
                                                                      "type").splitlines() if "\t" in line)
        assert exchanges[queue] == "topic", exchanges
    finally:
        vault.state.hold_writes.set()
        cluster.stop()


def test_ping_names_an_unreachable_or_refusing_broker_in_one_line_without_the_password(
    tmp_path: Path, rabbit: Rabbit, redis_server: str, emulator_server: EmulatorServer, vault: VaultTestServer,
) -> None:
    """A closed port and a wrong password each give one `fail celery broker: …` line naming the
    error and the host, exit 1, and never the password; the other services still show ok."""
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault)
    password = "pw-S3CRET-never-shown"
    cluster.env[PASSWORD_ENV] = password
    text = cluster.config.read_text()
    with socket.socket() as closed:  # bound, not listening: a connection is refused at once
        closed.bind((HOST, 0))
        port = closed.getsockname()[1]
        cluster.config.write_text(text.replace(f"{HOST}:{PORT}", f"{HOST}:{port}"))
        started = time.monotonic()
        result = cluster.cli("check-config", "--ping")
        assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if "celery broker" in line]
    assert len(lines) == 1 and lines[0].startswith("fail celery broker: "), result.stderr
    assert "Connection refused" in lines[0] and f"{HOST}:{port}" in lines[0], lines
    assert "ok   state redis" in result.stderr and "ok   keyservice http" in result.stderr
    cluster.config.write_text(text)  # the real broker, the wrong password
    refused = cluster.cli("check-config", "--ping")
    assert refused.returncode == 1, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if "celery broker" in line]
    assert len(lines) == 1 and "ACCESS_REFUSED" in lines[0], refused.stderr
    for output in (result.stdout + result.stderr, refused.stdout + refused.stderr):
        assert password not in output


def test_a_message_the_broker_refuses_is_reported_not_lost(
    tmp_path: Path, rabbit: Rabbit, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    vault: VaultTestServer,
) -> None:
    """Publisher confirms: the queue is full and refuses publishes (`max-length` 0,
    `overflow = reject-publish`, a policy on this run's vhost), so RabbitMQ nacks `rotate --enqueue`'s
    message. The command fails naming the key and the refusal, records nothing as sent, and
    nothing was reset."""
    if not rabbit.private:
        pytest.skip("needs a private vhost (rabbitmqctl) to set a policy on")
    keys = due_keys(emulator)
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault)
    try:
        from kombu import Connection, Queue

        with Connection(f"amqp://guest:guest@{HOST}:{PORT}/{rabbit.vhost}", connect_timeout=5) as conn:
            Queue(rabbit.queue, channel=conn.channel()).declare()  # as a worker would
        rabbit.ctl("set_policy", "-p", rabbit.vhost, "--apply-to", "queues", "reject-all", f"^{rabbit.queue}$",
                   '{"max-length": 0, "overflow": "reject-publish"}')
        try:
            sent = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys[0], "--apply", "--enqueue")
        finally:
            rabbit.ctl("clear_policy", "-p", rabbit.vhost, "reject-all")
        assert sent.returncode == 1, sent.stderr
        assert f"not sent acme-prod/{keys[0]}: RabbitMQ refused the message (a publisher-confirm nack" in sent.stderr
        assert "0 sent before it" in sent.stderr and "Traceback" not in sent.stderr, sent.stderr
        history = [json.loads(e) for e in cluster.db.lrange("rotator:history", 0, -1)]
        assert [e["keys"] for e in history if e.get("action") == "enqueue"] == [[]]
        time.sleep(1)
        assert emulator.ledger == []
    finally:
        cluster.stop()


def test_the_message_of_a_killed_worker_is_redelivered_and_the_key_reset_once(
    tmp_path: Path, rabbit: Rabbit, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    vault: VaultTestServer, keyservice: HttpKeyService,
) -> None:
    """A worker is SIGKILLed after the reset, before any sink write, holding the message
    unacknowledged (acks_late). RabbitMQ hands the same message to the next worker as soon as the
    dead one's connection closes; that worker finishes the attempt by replay: one reset, every sink
    holds the secret, the message acknowledged once (the queue ends empty)."""
    keys = due_keys(emulator)
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault)
    try:
        vault.state.hold_writes.clear()  # Vault writes hang: the worker is caught with the secret in memory
        first = cluster.worker()
        sent = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys[0], "--apply", "--enqueue",
                           "--json")
        assert sent.returncode == 0, sent.stderr
        task_id = json.loads(sent.stdout)["enqueued"][0]
        wait_for(lambda: len(emulator.ledger) == 1, 30, "the reset")
        wait_for(lambda: ("POST", f"secret/data/rotator/acme-prod/{keys[0]}") in vault.state.requests, 30,
                 "the vault write")
        cluster.kill(first)
        vault.state.hold_writes.set()
        cluster.worker()
        second_log = cluster.outputs[-1]
        wait_for(lambda: f"Task rotator.rotate_key[{task_id}] received".encode() in second_log.read_bytes(), 30,
                 "the killed worker's message, redelivered")
        wait_for(lambda: settled(cluster, emulator, keyservice, [keys[0]]), 60, "the rotation to be stored")
        assert reset_counts(emulator) == {keys[0]: 1}
        wait_for(lambda: re.search(rf"Task rotator\.rotate_key\[{task_id}\] (succeeded|retry)".encode(),
                                   second_log.read_bytes()) is not None, 30, "the redelivered task to finish")
        if rabbit.private:
            wait_for(lambda: all(line.split("\t")[1:] == ["0", "0"] for line in rabbit.ctl(
                "list_queues", "-p", rabbit.vhost, "name", "messages_ready", "messages_unacknowledged").splitlines()
                if line.startswith(f"{rabbit.queue}\t")), 30, "the queue to be empty")
    finally:
        vault.state.hold_writes.set()
        cluster.stop()


@pytest.fixture
def short_consumer_timeout(rabbit: Rabbit) -> Iterator[float]:
    """RabbitMQ's consumer_timeout at 4 s (checked every second) for this test, restored after.
    Before 3.12 there is no per-queue `consumer-timeout` policy, so this is the broker's own
    setting: other runs on this machine wait for `broker_to_ourselves`, and the broker gets its
    values back."""
    if not shutil.which("rabbitmqctl"):
        pytest.skip("needs rabbitmqctl to change the broker's consumer_timeout and restore it")
    names = ("consumer_timeout", "channel_tick_interval")
    if SAVED.exists():  # a run killed inside this fixture left its values behind: put them back first
        _restore(rabbit, json.loads(SAVED.read_text()))
        SAVED.unlink()
    before = {n: rabbit.ctl("eval", f"application:get_env(rabbit, {n}).").strip() for n in names}
    SAVED.write_text(json.dumps(before))
    try:
        rabbit.ctl("eval", "application:set_env(rabbit, consumer_timeout, 4000).")
        rabbit.ctl("eval", "application:set_env(rabbit, channel_tick_interval, 1000).")
        yield 4.0
    finally:
        failures = _restore(rabbit, before)
        after = {n: rabbit.ctl("eval", f"application:get_env(rabbit, {n}).").strip() for n in names}
        assert not failures and after == before, (failures, after, before)
        SAVED.unlink()


def _restore(rabbit: Rabbit, values: dict[str, str]) -> list[str]:
    """Put the broker's settings back (`{ok,N}` or `undefined`), each even if another fails."""
    failures = []
    for name, value in values.items():
        found = re.fullmatch(r"\{ok,(\d+)\}", value)
        try:
            rabbit.ctl("eval", f"application:set_env(rabbit, {name}, {found.group(1)})." if found
                       else f"application:unset_env(rabbit, {name}).")
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    return failures


def test_a_message_held_past_the_consumer_timeout_is_delivered_again_and_the_key_reset_once(
    tmp_path: Path, rabbit: Rabbit, short_consumer_timeout: float, redis_server: str, emulator: Emulator,
    emulator_server: EmulatorServer, vault: VaultTestServer, keyservice: HttpKeyService,
) -> None:
    """A rotation outlasts the broker's consumer_timeout (what `check-config` refuses when
    `celery.consumer_timeout_s` is not above the longest rotation): RabbitMQ closes the worker's
    channel and requeues the message; Celery takes that for an unrecoverable error, lets the running
    rotation finish and exits. The worker started again (as a supervisor would) gets the message
    again and changes nothing (its gate finds the id acknowledged already, or the engine finds the
    key rotated): one reset, stored everywhere."""
    keys = due_keys(emulator)
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault)
    try:
        vault.state.hold_writes.clear()  # the rotation hangs at its Vault write, past the timeout
        first = cluster.worker()
        sent = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys[0], "--apply", "--enqueue",
                           "--json")
        assert sent.returncode == 0, sent.stderr
        task_id = json.loads(sent.stdout)["enqueued"][0]
        log = cluster.outputs[0]
        wait_for(lambda: b"Unrecoverable error: PreconditionFailed" in log.read_bytes(),
                 30 + 3 * short_consumer_timeout, "RabbitMQ to close the channel past its consumer_timeout")
        vault.state.hold_writes.set()
        first.wait(60)  # the running rotation finishes, then the worker exits
        wait_for(lambda: settled(cluster, emulator, keyservice, [keys[0]]), 30, "the first run's store")
        cluster.worker()
        again = cluster.outputs[-1]
        # Run again (its acknowledgement never left) or, since the first worker did send one that
        # RabbitMQ dropped, refused as done already: either way it changes nothing.
        done_again = re.compile(rf'Task rotator\.rotate_key\[{task_id}\] (succeeded|retry)|"reason": "already_done", '
                                rf'"task": "rotator\.rotate_key", "task_id": "{task_id}"'.encode())
        wait_for(lambda: done_again.search(again.read_bytes()) is not None, 60, "the requeued message, settled")
        assert reset_counts(emulator) == {keys[0]: 1}
        assert settled(cluster, emulator, keyservice, [keys[0]])
    finally:
        vault.state.hold_writes.set()
        cluster.stop()


def test_forged_and_replayed_messages_do_nothing_over_rabbitmq(
    tmp_path: Path, rabbit: Rabbit, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    vault: VaultTestServer, keyservice: HttpKeyService,
) -> None:
    """Over RabbitMQ (headers in an AMQP table, not JSON): an unsigned `rotate_key` with force, an
    unsigned `notify` and a signed `rotate_key` whose arguments were changed are refused, and a
    broadcast `shutdown` gets no answer; a signed message rotates, and the same message published
    again after it was consumed is refused as a replay. One reset."""
    from rotator.state import RedisState

    keys = due_keys(emulator)
    cluster = rabbit_cluster(tmp_path, rabbit, redis_server, emulator_server, vault)
    try:
        cluster.worker()
        from celery import Celery

        app = Celery(broker=f"amqp://guest:guest@{HOST}:{PORT}/{rabbit.vhost}")
        app.conf.update(task_default_queue=rabbit.queue, broker_transport_options={"confirm_publish": True})
        seen = str(keyservice.get_key("acme-prod", keys[0]).generation)
        args = ["acme-prod", keys[0], "manual", seen]
        worker = cluster.procs[0]
        app.control.broadcast("shutdown", reply=False)
        with publishing_as(None):
            app.send_task("rotator.rotate_key", args=args, kwargs={"force": True})
            app.send_task("rotator.notify", args=[0, {"event": "rotation.succeeded", "severity": "info",
                                                      "client_id": "acme-prod", "key_id": keys[0]}])
        with publishing_as(local_signer(), tamper=lambda h, b: b[0].__setitem__(1, keys[1])):
            app.send_task("rotator.rotate_key", args=list(args))  # its own list: the tamper changes it
        state = RedisState.from_url(f"{redis_server}/0")
        wait_for(lambda: state.refused() == {"unsigned": 2, "bad_signature": 1}, 20, "the three refusals")
        assert worker.poll() is None  # the broadcast shutdown did nothing
        task_id = str(uuid.uuid4())
        with publishing_as(local_signer(), same_stamp=True):
            app.send_task("rotator.rotate_key", args=args, task_id=task_id)
            wait_for(lambda: settled(cluster, emulator, keyservice, [keys[0]]), 45, "the signed message's rotation")
            time.sleep(0.5)  # acknowledged once its result is stored
            app.send_task("rotator.rotate_key", args=args, task_id=task_id)
        wait_for(lambda: state.refused().get("replayed") == 1, 20, "the replay's refusal")
        assert reset_counts(emulator) == {keys[0]: 1}
    finally:
        cluster.stop()
