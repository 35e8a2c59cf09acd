"""A fleet that heals itself: real Celery workers and beats, a private Redis that is wiped, the
emulator over HTTP and a real Vault API (OpenBao) that is sealed and unsealed; nobody acts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rotator.keyservice.emulator import Emulator, Fault
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.openbao import PrivateOpenBao
from tests.conftest import FP_KEY, TOKEN
from tests.receiver import Receiver
from tests.test_celery import DAY, FP, Cluster, reset_counts, wait_for

pytestmark = pytest.mark.slow
REPAIR_EVERY_S = 5


def holds_current_secret(cluster: Cluster, emulator: Emulator, keyservice: HttpKeyService, key_id: str) -> bool:
    key = keyservice.get_key("acme-prod", key_id)
    want = FP(emulator.current_secret("acme-prod", key_id))
    try:
        return all((s := sink.read_state(key)) is not None and s.fingerprint == want for sink in cluster.sinks())
    except Exception:  # a sealed Vault: not held yet
        return False


def at_risk_alerts(receiver: Receiver) -> list[dict[str, Any]]:
    return [r.json() for r in list(receiver.received) if r.json()["event"] == "rotation.secret_at_risk"]


def test_a_wiped_redis_after_an_at_risk_reset_heals_within_one_interval_with_one_reset(
    tmp_path: Path, redis_server: str, emulator: Emulator, emulator_server: EmulatorServer,
    keyservice: HttpKeyService, openbao: PrivateOpenBao, bao_sink: dict[str, object],
) -> None:
    """A reset whose Vault write failed (sealed) leaves its secret at risk; then Redis is wiped,
    so no attempt record is left to recover. With nobody acting, beat's repair sweep tells the
    at-risk secret again with the time left while Vault stays sealed, and once it is unsealed
    stores the replayed secret in every sink within one interval: one reset in total."""
    key_id = next(iter(emulator.add_client("acme-prod", created_at=emulator.now() - 400 * DAY).keys))
    with Receiver() as receiver:
        cluster = Cluster(tmp_path, redis_server, emulator_server.url, "", "", vault=bao_sink, sink_retry_s=1,
                          celery=f"repair_every_s = {REPAIR_EVERY_S}", extra=f"""
[[alerts]]
url = "webhook+{receiver.url}/hook"
secret_env = "HOOK_SECRET"
events = ["rotation.secret_at_risk", "rotation.recovered"]
""")
        # The reset commits, its answer is slow to come back, and Vault is sealed meanwhile: the
        # write fails after the reset, so the new secret is in the file sink only.
        emulator.add_fault(Fault(method="POST", path="/reset", late_s=3.0))
        try:
            rotation = cluster.start("rotate", "--client-id", "acme-prod", "--key-id", key_id, "--apply")
            wait_for(lambda: len(emulator.ledger) == 1, 30, "the reset")
            openbao.seal()
            assert rotation.wait(60) == 1, cluster.outputs[-1].read_text()
            first = json.loads(cluster.db.get(f"rotator:attempt:acme-prod/{key_id}") or b"{}")
            assert first.get("phase") == "storing", first  # recovery would have found it here ...
            cluster.db.flushall()  # ... but Redis loses everything

            cluster.worker()
            cluster.start("beat", "--schedule", str(tmp_path / "beat"))
            wait_for(lambda: any(a["attempt_id"] != first["attempt_id"] for a in at_risk_alerts(receiver)),
                     4 * REPAIR_EVERY_S + 30, "the sweep to tell the at-risk secret again")
            again = next(a for a in at_risk_alerts(receiver) if a["attempt_id"] != first["attempt_id"])
            assert 0 < again["details"]["time_left_s"] <= DAY and again["details"]["replayable_until"]
            assert not holds_current_secret(cluster, emulator, keyservice, key_id)

            openbao.unseal()
            unsealed = time.monotonic()
            wait_for(lambda: holds_current_secret(cluster, emulator, keyservice, key_id), 4 * REPAIR_EVERY_S + 60,
                     "the secret in every sink")
            took = time.monotonic() - unsealed
            assert took < REPAIR_EVERY_S + 10, f"healed {took:.1f} s after Vault came back"
            assert reset_counts(emulator) == {key_id: 1}  # a replay, never a second reset
            wait_for(lambda: "rotation.recovered" in receiver.events(), 30, "the recovery to be told")
            history = [json.loads(x) for x in cluster.db.lrange("rotator:history", 0, -1)]
            assert any(h.get("status") == "recovered" and h.get("trigger") == "repair" for h in history), history
            secret = emulator.current_secret("acme-prod", key_id)
            written = cluster.everything_written() + "".join(r.body.decode() for r in receiver.attempts)
            assert secret not in written
        finally:
            openbao.unseal() if openbao.client().sys.is_sealed() else None
            cluster.stop()


def test_audit_mode_schedules_no_repair(tmp_path: Path, redis_server: str) -> None:
    """The repair sweep writes to sinks: a deployment in audit mode schedules none."""
    config = tmp_path / "rotator.toml"
    env = {**os.environ, "ROTATOR_CONFIG": str(config), "ROTATOR_KEYSERVICE_TOKEN": TOKEN,
           "ROTATOR_FINGERPRINT_KEY": FP_KEY}
    for mode, scheduled in (("audit", False), ("enforce", True)):
        config.write_text(f'[policy]\nmode = "{mode}"\n[state]\nredis_url = "{redis_server}/0"\n'
                          f'[celery]\nbroker_url = "{redis_server}/1"\n[[sinks]]\nkind = "memory"\n')
        out = subprocess.run([sys.executable, "-c", "from rotator.celeryconf import beat_schedule as b; "
                              "print(sorted(b))"], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert ("'repair'" in out) is scheduled, out
