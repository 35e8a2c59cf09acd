"""Real Celery workers and beats against a private Redis, the emulator and Vault over HTTP.

Every test ends by checking the emulator's ledger and every sink: each due key reset exactly
once, every sink holding the secret the key service accepts now.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

from rotator.domain import ApiKey
from rotator.embedded import group_running
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.sinks import registry
from tests.conftest import FP_KEY, TOKEN, redis_text
from tests.signed import local_signer, publishing_as
from tests.vault_server import VaultTestServer

pytestmark = pytest.mark.slow
WINDOW_S = 12  # the rate-limit test's first window: long enough for one run, short enough to wait for
FP = Fingerprinter(FP_KEY)
DAY = 86_400
ROOT = Path(__file__).resolve().parents[1]


class Cluster:
    """A config file and the processes started for one test; everything they print is kept."""

    def __init__(self, tmp: Path, redis_url: str, emulator_url: str, vault_url: str, vault_token: str,
                 mode: str = "enforce", extra: str = "", broker: str = "", policy: str = "",
                 vault: dict[str, Any] | None = None, file_path: str = "{client_id}/{key_id}.secret",
                 celery: str = "", sink_retry_s: float = 30) -> None:
        """`broker`: the `[celery]` lines naming another broker (and no result backend) instead of
        the private Redis's databases 1 and 2; `policy`, `celery`: more `[policy]`, `[celery]` lines;
        `vault`: the Vault sink's settings (AppRole on OpenBao, say) instead of a root token on `vault_url`."""
        self.tmp = tmp
        self.vault_url = vault_url
        self.vault = vault or {"url": vault_url}
        self.file = {"dir": str(tmp / "secrets"), "path": file_path}
        self.broker_url = f"{redis_url}/1"
        self.db = redis.Redis.from_url(redis_url)
        self.db.flushall()
        self.env = {**os.environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY,
                    "ROTATOR_FILE_KEY": Fernet.generate_key().decode(), "VAULT_TOKEN": vault_token,
                    "ROTATOR_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1", "HOOK_SECRET": "hook-secret-1",
                    "ROTATOR_IDEMPOTENCY_KEY": "workers-own-idempotency-secret"}
        self.config = tmp / "rotator.toml"
        broker = broker or f'broker_url = "{redis_url}/1"\nresult_backend = "{redis_url}/2"'
        self.config.write_text(f"""
[keyservice]
url = "{emulator_url}"
max_attempts = 3
retry_max_wait_s = 0.5
[policy]
mode = "{mode}"
{policy}
[state]
redis_url = "{redis_url}/0"
lock_ttl_s = 10
[celery]
{broker}
scan_every_s = 2
recover_every_s = 3600
visibility_timeout_s = 600
concurrency = 2
alert_outbox_dir = "{tmp / 'outbox'}"
{celery}
[engine]
sink_retry_s = {sink_retry_s}
idempotency_key_env = "ROTATOR_IDEMPOTENCY_KEY"
[[sinks]]
kind = "file"
{chr(10).join(f"{k} = {json.dumps(v)}" for k, v in self.file.items())}
[[sinks]]
kind = "vault"
{chr(10).join(f"{k} = {json.dumps(v)}" for k, v in self.vault.items())}
{extra}
""")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: list[Path] = []
        self.env_before: dict[str, str | None] = {}  # what `sinks` changed in this process's environment

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"proc-{len(self.procs)}.log"
        self.outputs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "rotator.cli", *args, "--config", str(self.config)],
                                env=self.env, cwd=self.tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self) -> subprocess.Popen[bytes]:
        proc = self.start("worker", "--loglevel", "DEBUG")
        wait_for(lambda: b" ready." in self.outputs[-1].read_bytes(), 30, "worker ready")
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "rotator.cli", *args, "--config", str(self.config)],
                                env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=60)
        self.outputs.append(self.tmp / f"cli-{uuid.uuid4().hex}.log")
        self.outputs[-1].write_text(result.stdout + result.stderr)
        return result

    def sinks(self) -> list[Any]:
        """The run's sinks, read in this process: their credentials stay in its environment until `stop`."""
        names = ("ROTATOR_FILE_KEY", "VAULT_TOKEN")
        self.env_before = self.env_before or {k: os.environ.get(k) for k in names}
        os.environ.update({k: self.env[k] for k in names})
        return [registry.build("file", self.file, FP),
                registry.build("vault", self.vault, FP)]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children, and return once none of them runs any more
        (a child can outlive its parent's exit by a few scheduler ticks on a loaded machine)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not group_running(proc.pid), 10, "the worker's process group to die")

    def stop(self) -> None:
        stop_groups(self.procs)
        for name, value in self.env_before.items():  # no later test inherits them
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def everything_written(self) -> str:
        """Every log line, CLI output and Redis key and value the run produced."""
        parts = [p.read_text(errors="replace") for p in self.outputs if p.exists()]
        for db in (0, 1, 2):
            conn = self.db.connection_pool.connection_kwargs
            r = redis.Redis(host=conn["host"], port=conn["port"], db=db)
            parts.append(redis_text(r))
        return "\n".join(parts)


def stop_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group (woken first, should one be stopped), SIGKILL what is left after 15 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def vault() -> Iterator[VaultTestServer]:
    with VaultTestServer() as server:
        yield server


@pytest.fixture
def world(tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
          vault: VaultTestServer) -> Iterator[tuple[Cluster, dict[str, str]]]:
    now = emulator.now()
    c = emulator.add_client("acme-prod", "Acme", created_at=now - 400 * DAY)
    due = [next(iter(c.keys)), emulator.add_key("acme-prod", "payouts", created_at=now - 95 * DAY).id]
    emulator.add_key("acme-prod", "reports", created_at=now - 10 * DAY)
    cluster = Cluster(tmp_path, redis_server, emulator_server.url, vault.url, vault.root_token)
    yield cluster, {"due1": due[0], "due2": due[1]}
    cluster.stop()


def settled(cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, key_ids: list[str]) -> bool:
    """Every sink holds, for each key, the secret the key service accepts now."""
    for key_id in key_ids:
        key: ApiKey = keyservice.get_key("acme-prod", key_id)
        want = FP(emulator.current_secret("acme-prod", key_id))
        for sink in cluster.sinks():
            state = sink.read_state(key)
            if state is None or state.fingerprint != want:
                return False
    return True


def reset_counts(emulator: Emulator) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in emulator.ledger:
        counts[entry.key_id] = counts.get(entry.key_id, 0) + 1
    return counts


def test_worker_killed_after_reset_recovers_by_replay(
    world: tuple[Cluster, dict[str, str]], emulator: Emulator, keyservice: HttpKeyService, vault: VaultTestServer
) -> None:
    """Fault 2: SIGKILL after the reset, before any sink write; a new worker replays the same secret."""
    cluster, keys = world
    vault.state.hold_writes.clear()  # Vault writes hang: the worker is caught with the secret in memory
    first = cluster.worker()
    result = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys["due1"], "--apply", "--enqueue")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(emulator.ledger) == 1, 30, "the reset")
    wait_for(lambda: ("POST", f"secret/data/rotator/acme-prod/{keys['due1']}") in vault.state.requests, 30,
             "the vault write")
    cluster.kill(first)
    assert cluster.db.smembers(b"rotator:attempts") == {f"acme-prod/{keys['due1']}".encode()}
    vault.state.hold_writes.set()
    cluster.worker()
    wait_for(lambda: not cluster.db.smembers(b"rotator:attempts"), 90, "recovery to finish the attempt")
    assert settled(cluster, emulator, keyservice, [keys["due1"]])
    assert reset_counts(emulator) == {keys["due1"]: 1}

    def history() -> list[dict[str, Any]]:
        return [json.loads(x) for x in cluster.db.lrange("rotator:history", 0, -1)]

    # The record goes first, then the history entry is written: wait for the entry, not the record.
    wait_for(lambda: any(h["kind"] == "rotation" for h in history()), 30, "the rotation's history entry")
    assert [h["status"] for h in history() if h["kind"] == "rotation"] == ["recovered"]
    assert [h["action"] for h in history() if h["kind"] == "manual"] == ["enqueue"]


def test_two_beats_and_a_manual_apply_rotate_each_key_once(
    world: tuple[Cluster, dict[str, str]], emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """Fault 4: two beats and `rotate --all-due --apply` together: each due key reset once."""
    cluster, keys = world
    cluster.worker()
    cluster.start("beat", "--schedule", str(cluster.tmp / "beat-a"))
    cluster.start("beat", "--schedule", str(cluster.tmp / "beat-b"))
    manual = cluster.cli("rotate", "--all-due", "--apply", "--json")
    assert manual.returncode in (0, 1), manual.stderr
    wait_for(lambda: settled(cluster, emulator, keyservice, list(keys.values())), 60, "both keys stored")
    time.sleep(4)  # two more beat intervals: nothing is rotated again
    assert reset_counts(emulator) == {keys["due1"]: 1, keys["due2"]: 1}
    assert settled(cluster, emulator, keyservice, list(keys.values()))


def test_redelivered_message_rotates_once_and_nothing_leaks(
    world: tuple[Cluster, dict[str, str]], emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """Faults 5 and 7: the same signed message twice rotates once; at DEBUG with results on, no
    secret anywhere."""
    cluster, keys = world
    cluster.worker()
    from celery import Celery

    app = Celery(broker=cluster.broker_url)
    app.conf.task_default_queue = "rotator"
    task_id = str(uuid.uuid4())
    seen = str(keyservice.get_key("acme-prod", keys["due1"]).generation)
    with publishing_as(local_signer(), same_stamp=True):
        for _ in range(2):
            app.send_task("rotator.rotate_key", args=["acme-prod", keys["due1"], "schedule", seen], task_id=task_id)
    wait_for(lambda: settled(cluster, emulator, keyservice, [keys["due1"]]), 60, "rotation")
    time.sleep(1)
    assert reset_counts(emulator) == {keys["due1"]: 1}
    status = cluster.cli("status", "--json", "--history", "--limit", "10")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert any(r["key_id"] == keys["due1"] and r["last_rotation"]["status"] == "succeeded" for r in report["keys"])
    assert report["drift"] == []
    secret = emulator.current_secret("acme-prod", keys["due1"])
    written = cluster.everything_written()
    assert "rotation.succeeded" in written and keys["due1"] in written  # the logs are really there
    assert secret not in written
    # rotator's lines keep their level in the worker's log (not re-logged as celery.redirected warnings)
    lines = [json.loads(line) for line in cluster.outputs[0].read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "rotation.finished" and e.get("level") == "info" for e in lines)
    assert "celery.redirected" not in cluster.outputs[0].read_text()
    probe = cluster.cli("health", "--worker")  # the probe of systemd units and Kubernetes manifests
    assert probe.returncode == 0 and "ok   worker celery@" in probe.stderr, probe.stderr


def test_audit_mode_and_plans_change_nothing(
    tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer, vault: VaultTestServer
) -> None:
    """Fault 8: audit mode scans report overdue keys; a plan without --apply resets nothing."""
    now = emulator.now()
    emulator.add_client("acme-prod", "Acme", created_at=now - 400 * DAY)
    cluster = Cluster(tmp_path, redis_server, emulator_server.url, vault.url, vault.root_token, mode="audit")
    try:
        cluster.worker()
        cluster.start("beat", "--schedule", str(tmp_path / "beat"))
        plan = cluster.cli("rotate", "--all-due", "--json")
        assert plan.returncode == 0 and json.loads(plan.stdout)["applied"] is False
        wait_for(lambda: b"key.overdue" in b"".join(p.read_bytes() for p in cluster.outputs if p.exists()), 30,
                 "an overdue report")
        assert emulator.ledger == []
    finally:
        cluster.stop()


def test_broken_alert_receiver_neither_slows_nor_loses_the_alert(
    tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer, vault: VaultTestServer,
    keyservice: HttpKeyService,
) -> None:
    """A receiver that hangs and answers 500 leaves the rotation fast; the worker retries until delivered."""
    from rotator.alerts.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
    from tests.receiver import Receiver

    now = emulator.now()
    key_id = next(iter(emulator.add_client("acme-prod", created_at=now - 400 * DAY).keys))
    with Receiver() as receiver:
        receiver.answers = [500, 500]
        receiver.hang_s = 1.5
        cluster = Cluster(tmp_path, redis_server, emulator_server.url, vault.url, vault.root_token, extra=f"""
[[alerts]]
url = "webhook+{receiver.url}/hook"
secret_env = "HOOK_SECRET"
events = ["rotation.succeeded"]
""")
        try:
            cluster.worker()
            result = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", key_id, "--apply", "--json")
            assert result.returncode == 0, result.stderr
            rotation = json.loads(result.stdout)["results"][0]
            assert rotation["status"] == "succeeded" and rotation["timings"]["total_s"] < 1.0
            got = receiver.wait_for(1, timeout=60)[0]
            assert got.json()["event"] == "rotation.succeeded" and got.json()["key_id"] == key_id
            assert verify_signature("hook-secret-1", got.headers[TIMESTAMP_HEADER], got.body, got.headers[SIGNATURE_HEADER])
            from standardwebhooks import Webhook  # the worker's real request, by an independent implementation

            assert Webhook(b"hook-secret-1").verify(got.body, got.headers)["key_id"] == key_id
            assert receiver.answers == []  # both failures were really retried through
            ids = {a.headers["webhook-id"] for a in receiver.attempts}
            assert len(receiver.attempts) == 3 and ids == {got.headers["webhook-id"]}  # one delivery, one id
            assert emulator.current_secret("acme-prod", key_id).encode() not in got.body
        finally:
            cluster.stop()


def test_a_broker_client_can_neither_stop_nor_steer_the_workers(
    world: tuple[Cluster, dict[str, str]], emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """Attack: any client of the broker broadcasts Celery's remote-control commands. With remote
    control on, `shutdown` alone stops the worker and `ping` finds it (the others are sent too;
    `rate_limit` and `revoke` would steer it). It is off: nothing answers, the worker lives on and
    runs the next rotation, and `health --worker` passes from the worker's heartbeat in Redis; a
    worker stopped cleanly is reported at once."""
    cluster, keys = world
    worker = cluster.worker()
    wait_for(lambda: cluster.cli("health", "--worker").returncode == 0, 20, "the worker's heartbeat")
    # and it writes no core file (rotator.safety.no_core_dumps at start; its pool inherits it)
    assert re.search(r"Max core file size\s+0\s+0\s", Path(f"/proc/{worker.pid}/limits").read_text())
    from celery import Celery

    attacker = Celery(broker=cluster.broker_url)
    try:
        for command, arguments in (("shutdown", {}), ("pool_restart", {"reload": True}),
                                   ("rate_limit", {"task_name": "rotator.rotate_key", "rate_limit": "1/h"}),
                                   ("autoscale", {"max": 0, "min": 0}), ("revoke", {"task_id": "*"})):
            attacker.control.broadcast(command, arguments=arguments, reply=False)
        replies = attacker.control.ping(timeout=2)
    finally:
        attacker.close()
    assert replies == []  # nothing answers a broker client
    time.sleep(2)
    assert worker.poll() is None, cluster.outputs[0].read_text()[-2000:]
    sent = cluster.cli("rotate", "--client-id", "acme-prod", "--key-id", keys["due1"], "--apply", "--enqueue")
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: settled(cluster, emulator, keyservice, [keys["due1"]]), 45, "the rotation after the attack")
    assert reset_counts(emulator) == {keys["due1"]: 1}
    probe = cluster.cli("health", "--worker")
    assert probe.returncode == 0 and "ok   worker celery@" in probe.stderr, probe.stderr
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(30)
    stopped = cluster.cli("health", "--worker")
    assert stopped.returncode == 1 and "no heartbeat within" in stopped.stderr, stopped.stderr


def test_workers_spend_only_their_share_and_finish_the_rest_after_the_window(
    world: tuple[Cluster, dict[str, str]], emulator: Emulator, keyservice: HttpKeyService
) -> None:
    """Two workers of two processes each, twelve due keys, 40 calls left in the 15-minute window
    and a share of 0.5: counted at the emulator, the fleet (the workers and the CLI that enqueued)
    sends at most 20 calls and draws no 429; what it rotated is in every sink, the rest is deferred
    (no attempt left, nothing failed), and once the window starts again the next run rotates the
    rest, each key once, and nothing written holds a secret."""
    from rotator.keyservice.emulator import DEFAULT_RATE_LIMITS, RATE_WINDOWS_S
    from tests.test_fleet_budget import Counted

    cluster, keys = world
    now = emulator.now()
    due = list(keys.values()) + [emulator.add_key("acme-prod", f"bulk-{n}", created_at=now - 100 * DAY).id
                                 for n in range(10)]
    cluster.env.update({"ROTATOR_KEYSERVICE__MAX_SHARE_OF_RATE_LIMIT": "0.5",
                        "ROTATOR_KEYSERVICE__RATE_LIMIT_RESERVE": "0"})
    cluster.worker()
    cluster.worker()
    emulator.rate_windows_s = (WINDOW_S, *RATE_WINDOWS_S[1:])  # a first window that resets within the test
    emulator.spend_calls("acme-prod", DEFAULT_RATE_LIMITS[0] - 40)  # the platform's payments
    started = time.monotonic()
    counted = Counted(emulator)

    def deferred() -> set[str]:
        lines = "\n".join(p.read_text(errors="replace") for p in cluster.outputs if p.exists()).splitlines()
        return {m.group(1) for line in lines if '"rotation.deferred"' in line
                for m in [re.search(r'"key_id": "([^"]+)"', line)] if m}

    assert cluster.cli("rotate", "--all-due", "--apply", "--enqueue").returncode == 0
    wait_for(lambda: len(emulator.ledger) + len(deferred()) == len(due), 60, "every key rotated or deferred")
    assert time.monotonic() - started < WINDOW_S, "the window reset before the first run was over"
    assert counted.calls <= 20 and counted.refused == 0, (counted.calls, counted.refused)
    rotated = [e.key_id for e in emulator.ledger]
    assert rotated and deferred() and not set(rotated) & deferred()
    assert settled(cluster, emulator, keyservice, rotated)
    assert not cluster.db.smembers(b"rotator:attempts")

    time.sleep(max(0.0, WINDOW_S + 1 - (time.monotonic() - started)))  # the window starts again
    assert cluster.cli("rotate", "--all-due", "--apply", "--enqueue").returncode == 0
    wait_for(lambda: settled(cluster, emulator, keyservice, due), 60, "the deferred keys rotated")
    assert reset_counts(emulator) == dict.fromkeys(due, 1)
    written = cluster.everything_written()
    assert not any(emulator.current_secret("acme-prod", key_id) in written for key_id in due)
