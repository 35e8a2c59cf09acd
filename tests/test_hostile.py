"""The CLI against a key service that lies (tests/hostile_server.py), one lie per case, as an operator
runs it: `rotator scan` and `rotator rotate --all-due --apply` in their own processes.

For every case: the exit code; nothing written outside the file sink's root (a victim file beside it
stays as it was); no secret the service issued, and no raw control character, in what was printed;
finished within its deadline; and how many resets ran (a recoverable secret is recovered with one).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from tests.conftest import FP_KEY, redis_text
from tests.hostile_server import TOKEN, LyingKeyService, RawServer

ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float


@dataclass
class World:
    service: LyingKeyService
    server: RawServer
    config: Path
    tmp: Path
    sink_root: Path
    fernet: Fernet
    env: dict[str, str]
    redis_url: str

    def cli(self, *args: str, timeout: float = 60.0) -> Run:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "rotator.cli", *args, "--config", str(self.config)],
                                env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp)
        return Run(result.returncode, result.stdout, result.stderr, time.monotonic() - started)

    def outside(self) -> dict[str, bytes | str]:
        """Every file of the test's directory outside the sink root, with its content (but the
        signing key `rotate --enqueue` makes on first use in the private state directory)."""
        found: dict[str, bytes | str] = {}
        for path in sorted(self.tmp.rglob("*")):
            if path == self.sink_root or self.sink_root in path.parents:
                continue
            if path == self.tmp / "state" / "rotator" / "signing.key":
                continue
            found[str(path.relative_to(self.tmp))] = path.read_bytes() if path.is_file() else "dir"
        return found

    def stored(self, key_id: str) -> dict[str, object] | None:
        path = self.sink_root / "acme" / f"{key_id}.secret"
        if not path.exists():
            return None
        doc: dict[str, object] = json.loads(self.fernet.decrypt(path.read_bytes()))
        return doc


def world(tmp_path: Path, redis_url: str, lie: str) -> Iterator[World]:
    service = LyingKeyService(lie)
    with RawServer(service.handle) as server:
        file_key = Fernet.generate_key()
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "victim").write_text("must stay")
        sink_root = tmp_path / "secrets"
        (tmp_path / "state" / "rotator").mkdir(parents=True, mode=0o700)  # beat's private dir, made up front
        config = tmp_path / "rotator.toml"
        config.write_text(f"""
[keyservice]
url = "{server.url}"
timeout_s = 2.0
max_attempts = 2
retry_max_wait_s = 0.2
[policy]
mode = "enforce"
[state]
redis_url = "{redis_url}/0"
namespace = "hostile-{uuid.uuid4().hex[:8]}"
[celery]
broker_url = "{redis_url}/5"
[engine]
sink_retry_s = 2.0
[[sinks]]
kind = "file"
dir = "{sink_root}"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
        env.update({"ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY,
                    "ROTATOR_FILE_KEY": file_key.decode(), "COLUMNS": "200", "PYTHONPATH": str(ROOT),
                    "XDG_STATE_HOME": str(tmp_path / "state")})
        yield World(service, server, config, tmp_path, sink_root, Fernet(file_key), env, f"{redis_url}/0")


def check_run(w: World, run: Run, before: dict[str, bytes | str], deadline_s: float) -> None:
    printed = run.out + run.err
    for secret in w.service.issued:
        assert secret not in printed, "a secret was printed"
        assert secret[5:25] not in printed, "part of a secret was printed"
    for key in w.service.idempotency_keys:  # each reads a live secret from the stored answer
        assert key[:16].lower() not in printed.lower(), "an Idempotency-Key, or half of one, was printed"
    assert not CONTROL.search(printed), f"raw control characters printed: {CONTROL.findall(printed)[:5]}"
    assert "Traceback" not in printed, run.err[-2000:]
    assert w.outside() == before, "something was written outside the sink root"
    assert run.seconds < deadline_s, f"took {run.seconds:.1f}s, deadline {deadline_s}s"


@dataclass(frozen=True)
class Case:
    lie: str
    scan: int  # exit code of `rotator scan`
    rotate: int  # exit code of `rotator rotate --all-due --apply`
    resets: int  # resets that ran on the key service
    stored: bool  # key_due's file holds the last issued secret
    says: str = ""  # a phrase that stderr/stdout of the failing command contains
    deadline_s: float = 30.0


CASES = [
    Case("", 0, 0, 1, True),
    Case("listing_traversal_id", 1, 1, 0, False, "'Id' is not an id"),
    Case("listing_absolute_id", 1, 1, 0, False, "'Id' is not an id"),
    Case("long_key_id", 1, 1, 0, False, "'Id' is not an id"),
    Case("reset_names_other_key", 0, 1, 1, False, "another key"),
    Case("reset_traversal_id", 0, 1, 1, False, "'Id' is not an id"),
    Case("pages_forever", 1, 1, 0, False, "X-Number-Of-Pages is 1000000000", deadline_s=15.0),
    Case("pages_superscript", 1, 1, 0, False, "X-Number-Of-Pages"),
    Case("trickle_listing", 1, 1, 0, False, "no answer within 2s", deadline_s=15.0),
    Case("trickle_reset", 0, 0, 1, True, deadline_s=20.0),
    Case("huge_listing", 1, 1, 0, False, "larger than 1048576 bytes"),
    Case("gzip_bomb_listing", 1, 1, 0, False, "larger than 1048576 bytes"),
    Case("reset_cut", 0, 0, 1, True),
    Case("reset_not_json", 0, 0, 1, True),
    Case("reset_no_secret", 0, 1, 1, False, "no Secret"),
    Case("reset_surrogate_secret", 0, 1, 1, False, "not printable UTF-8"),
    Case("reset_secret_in_environment", 0, 1, 1, False, "'Environment' must be"),
    Case("reset_secret_in_alias", 0, 1, 1, False, "repeats its Secret"),
    Case("replay_secret_in_alias", 0, 1, 1, False, "repeats its Secret"),
    Case("replay_unavailable", 0, 1, 1, False, "replay of the stored answer failed: 503"),
    Case("gateway_echoes_key", 0, 1, 0, False, "retry with Idempotency-Key: {IdempotencyKey}"),
    Case("double_gzip_listing", 1, 1, 0, False, "Content-Encoding is not one of gzip or deflate"),
    Case("pages_alternating", 1, 1, 0, False, "twice"),
    Case("dates_in_ms", 1, 1, 0, False, "'LastResetDate' is not a date"),
    Case("dates_huge", 1, 1, 0, False, "'LastResetDate' is not a date"),
    Case("alias_markup", 0, 0, 1, True),
    Case("alias_escapes", 1, 1, 0, False, "'Alias' contains control characters"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.lie or "truthful")
def test_cli_against_a_lying_key_service(case: Case, tmp_path: Path, redis_server: str) -> None:
    for w in world(tmp_path, redis_server, case.lie):
        before = w.outside()
        scan = w.cli("scan")
        assert scan.code == case.scan, scan.err[-2000:]
        check_run(w, scan, before, case.deadline_s)
        rotate = w.cli("rotate", "--all-due", "--apply")
        assert rotate.code == case.rotate, rotate.out[-2000:] + rotate.err[-2000:]
        check_run(w, rotate, before, case.deadline_s)
        if case.says:
            failing = scan if scan.code else rotate
            assert case.says in failing.out + failing.err, failing.out[-1000:] + failing.err[-1000:]
        assert len(w.service.resets) == case.resets, w.service.resets
        assert w.service.resets in ([], ["key_due"]), "a key that was not due, or a bad id, was reset"
        doc = w.stored("key_due")
        if case.stored:
            assert doc is not None and doc["api_key"] == w.service.issued[-1] and doc["key_id"] == "key_due"
        else:
            assert doc is None
        assert w.stored("key_young") is None, "a secret was stored under another key"
        status = w.cli("status", "--history")
        check_run(w, status, before, case.deadline_s)
        with redis.Redis.from_url(w.redis_url) as r:
            stored = redis_text(r)
        assert not [s for s in w.service.issued if s in stored], "a secret is in Redis"
        assert not [k for k in w.service.idempotency_keys if k[:16].lower() in stored.lower()], "a key is in Redis"


def test_a_gzip_bomb_is_not_read_whole(tmp_path: Path, redis_server: str) -> None:
    """1 MB of gzip expanding to 1 GiB: scan stops at the cap; its peak memory stays far below 1 GiB."""
    for w in world(tmp_path, redis_server, "gzip_bomb_listing"):
        proc = subprocess.Popen([sys.executable, "-m", "rotator.cli", "scan", "--config", str(w.config)],
                                env=w.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=w.tmp)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 1
        assert usage.ru_maxrss * 1024 < 400 << 20, f"peak RSS {usage.ru_maxrss // 1024} MiB"


def test_enqueue_with_a_listing_that_never_ends_sends_a_bounded_number_of_tasks(
    tmp_path: Path, redis_server: str
) -> None:
    """`rotate --all-due --apply --enqueue` against `X-Number-Of-Pages: 1000000000` and the same rows
    on every page queued 658 tasks for 2 keys in 15 s; now the listing is refused at the second page."""
    broker = redis.Redis.from_url(f"{redis_server}/5")
    broker.flushdb()
    for w in world(tmp_path, redis_server, "pages_forever"):
        before = w.outside()
        run = w.cli("rotate", "--all-due", "--apply", "--enqueue")
        assert run.code == 1 and "X-Number-Of-Pages is 1000000000" in run.err
        check_run(w, run, before, 30.0)
        assert broker.llen("rotator") <= 2
        assert w.service.resets == []
    broker.flushdb()


def test_a_key_service_that_keeps_showing_the_old_reset_date_gets_no_reset_loop(
    tmp_path: Path, redis_server: str
) -> None:
    """The reset answers with a new LastResetDate, but gets and listings keep the old one, so the key
    stays "due": the next runs raise keyservice.protocol_error and reset nothing, even after a failed
    run in between (the verified rotation has its own slot, not the last history entry)."""
    for w in world(tmp_path, redis_server, "get_keeps_old_dates"):
        first = w.cli("rotate", "--all-due", "--apply")
        assert first.code == 0, first.err[-2000:]
        assert w.service.resets == ["key_due"]
        second = w.cli("rotate", "--all-due", "--apply")
        assert second.code == 0 and "protocol error" in second.out + second.err
        forced_fail = w.cli("rotate", "--client-id", "acme", "--key-id", "nope_key", "--apply")
        assert forced_fail.code == 1
        third = w.cli("rotate", "--all-due", "--apply")
        assert third.code == 0 and "keyservice.protocol_error" in third.err
        assert w.service.resets == ["key_due"]
