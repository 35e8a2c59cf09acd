"""Read-only parts: `rotator web`, `rotator metrics` and `rotator status` with a Redis user that may
only read, and no other credential, show what the workers publish; that user cannot push a task
or touch an attempt record. Against a real Redis with ACL users (the lines of docs/operations.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rotator.embedded import PrivateRedis, free_port
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from tests.test_celery import DAY, Cluster, settled, stop_groups, wait_for
from tests.test_celery import vault as vault  # the fixture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def acl_lines() -> list[str]:
    """The `ACL SETUSER` lines of docs/operations.md, with their `<…>` placeholders."""
    text = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"```\n(ACL SETUSER rotator .*?)```", text, re.S)
    assert block is not None, "docs/operations.md has no ACL SETUSER block"
    return [line for line in block.group(1).splitlines() if line.startswith("ACL SETUSER")]


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[PrivateRedis, dict[str, str]]]:
    passwords = {"admin": "admin-pw-0123456789", "rotator": "writer-pw-0123456789", "view": "reader-pw-0123456789"}
    with PrivateRedis() as server:
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        for line in acl_lines():
            line = line.replace("<writer password>", passwords["rotator"]).replace(
                "<reader password>", passwords["view"])
            assert admin.execute_command(*line.split()) in (b"OK", "OK"), line
        admin.execute_command("ACL", "SETUSER", "default", "on", f">{passwords['admin']}")
        yield server, passwords


def test_the_read_only_user_shows_everything_and_changes_nothing(
    tmp_path: Path, acl_redis: tuple[PrivateRedis, dict[str, str]], emulator: Emulator,
    emulator_server: EmulatorServer, vault: object, keyservice: HttpKeyService,
) -> None:
    server, passwords = acl_redis
    now = emulator.now()
    key_id = next(iter(emulator.add_client("acme-prod", "Acme", created_at=now - 400 * DAY).keys))
    emulator.add_key("acme-prod", "reports", created_at=now - 10 * DAY)
    admin_url = f"redis://default:{passwords['admin']}@127.0.0.1:{server.port}"
    cluster = Cluster(tmp_path, admin_url, emulator_server.url, vault.url, vault.root_token,  # type: ignore[attr-defined]
                      extra="[view]\npublish_every_s = 2\n")
    for who in ("rotator", "view"):
        (tmp_path / f"{who}.pw").write_text(passwords[who])
    writer = f'redis://rotator@127.0.0.1:{server.port}'
    cluster.config.write_text(cluster.config.read_text().replace(admin_url, writer).replace(
        "[state]\n", f'[state]\npassword_file = "{tmp_path / "rotator.pw"}"\n').replace(
        "[celery]\n", f'[celery]\npassword_file = "{tmp_path / "rotator.pw"}"\n'))
    reader_config = tmp_path / "view.toml"
    reader_config.write_text(f"""[state]
redis_url = "redis://rotator-view@127.0.0.1:{server.port}/0"
password_file = "{tmp_path / "view.pw"}"
[view]
source = "published"
""")
    # The readers' environment holds none of the workers' credentials.
    reader_env = {k: v for k, v in os.environ.items() if not k.startswith(("ROTATOR_", "VAULT_", "AWS_"))}
    readers: list[subprocess.Popen[bytes]] = []
    try:
        cluster.worker()
        cluster.start("beat", "--schedule", str(tmp_path / "beat"))
        wait_for(lambda: settled(cluster, emulator, keyservice, [key_id]), 60, "the due key rotated by the fleet")
        admin = redis.Redis.from_url(f"{admin_url}/0")
        wait_for(lambda: b"succeeded" in (admin.get("rotator:view") or b""), 30, "a view published after it")

        reader = redis.Redis(host="127.0.0.1", port=server.port, username="rotator-view", password=passwords["view"])
        for refused in (lambda: reader.lpush("rotator", b"{}"),
                        lambda: reader.set(f"rotator:attempt:acme-prod/{key_id}", "{}"),
                        lambda: reader.hincrby("rotator:metrics:rotations", "succeeded", 1),
                        lambda: reader.lrange("rotator", 0, -1),  # the queue itself: not even read
                        lambda: reader.eval("return 1", 0)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        assert reader.get("rotator:view") is not None

        status = subprocess.run([sys.executable, "-m", "rotator.cli", "status", "--json", "--history", "--config",
                                 str(reader_config)], env=reader_env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        row = next(r for r in report["keys"] if r["key_id"] == key_id)
        assert row["last_rotation"]["status"] == "succeeded" and set(row["sinks"].values()) == {"fresh"}
        assert any(h.get("key_id") == key_id for h in report["history"])
        # An auditor with the read-only user exports the audit trail and verifies it.
        trail = tmp_path / "audit.jsonl"
        for args in (["export", "--output", str(trail)], ["verify", str(trail)]):
            audit = subprocess.run([sys.executable, "-m", "rotator.cli", "audit", *args, "--config",
                                    str(reader_config)], env=reader_env, capture_output=True, text=True, timeout=60)
            assert audit.returncode == 0, audit.stderr
        assert audit.stdout.startswith("intact: ") and key_id in trail.read_text()

        web_port, metrics_port = free_port(), free_port()
        for args in (["web", "--port", str(web_port)], ["metrics", "--port", str(metrics_port)]):
            log = (tmp_path / f"{args[0]}.log").open("wb")
            readers.append(subprocess.Popen([sys.executable, "-m", "rotator.cli", *args, "--config", str(reader_config)],
                                            env=reader_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))

        def get(url: str) -> str:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return str(answer.read().decode())

        def answers(url: str) -> bool:
            try:
                get(url)
            except OSError:
                return False
            return True

        wait_for(lambda: answers(f"http://127.0.0.1:{web_port}/healthz"), 30, "the page")
        page = json.loads(get(f"http://127.0.0.1:{web_port}/api/status"))
        assert next(r for r in page["keys"] if r["key_id"] == key_id)["last_rotation"]["status"] == "succeeded"
        assert key_id in get(f"http://127.0.0.1:{web_port}/")
        assert "succeeded" in get(f"http://127.0.0.1:{web_port}/keys/acme-prod/{key_id}")
        wait_for(lambda: answers(f"http://127.0.0.1:{metrics_port}/metrics"), 30,
                 f"the metrics: {(tmp_path / 'metrics.log').read_text()[-2000:]}")
        scraped = get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert re.search(rf'rotator_key_age_seconds{{[^}}]*key_id="{key_id}"[^}}]*}} \d', scraped), scraped[:2000]
        assert 'rotator_rotations_total{result="succeeded"} 1.0' in scraped
        assert "rotator_view_published_timestamp_seconds " in scraped

        for probe, line in ((["health"], "ok   state redis"), (["check-config", "--ping"], "ok   fleet view")):
            checked = subprocess.run([sys.executable, "-m", "rotator.cli", *probe, "--config", str(reader_config)],
                                     env=reader_env, capture_output=True, text=True, timeout=60)
            assert checked.returncode == 0 and line in checked.stderr and "broker" not in checked.stderr, (
                checked.stderr)
        # The workers stop publishing and the view expires: the key gauges go, when it was published stays.
        cluster.stop()
        admin.delete("rotator:view", "rotator:view:gauges")
        stale = get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert "rotator_key_age_seconds{" not in stale and "rotator_view_published_timestamp_seconds " in stale
        refused_worker = subprocess.run([sys.executable, "-m", "rotator.cli", "worker", "--config",
                                         str(reader_config)], env=reader_env, capture_output=True, text=True,
                                        timeout=60)
        assert refused_worker.returncode == 2 and "reader's configuration" in refused_worker.stderr
    finally:
        stop_groups(readers)
        cluster.stop()
