"""The newcomer path: `rotator demo` rotates the seeded due keys and leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator.keyservice.emulator import Emulator
from rotator.policy import Policy
from rotator.scan import scan

pytestmark = pytest.mark.slow
SEED = Path(__file__).resolve().parents[1] / "rotator" / "demo" / "seed.json"


@contextlib.contextmanager
def rotating_demo(home: Path, out: Path, *flags: str) -> Iterator[subprocess.Popen[str]]:
    """`rotator demo --plain` with `flags`, its output in `out`, yielded once it has rotated the
    seed's three due keys (or 60 s have passed, or it died); Ctrl-C when the block ends."""
    started = time.monotonic()
    with out.open("w") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "rotator.cli", "demo", "--plain", *flags, "--home", str(home)],
                                stdout=sink, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while len(_succeeded(out.read_text())) < 3 and time.monotonic() - started < 60 and demo.poll() is None:
                time.sleep(0.5)
            yield demo
        finally:  # Ctrl-C, also when the block failed: the demo stops what it started (a kill would not)
            if demo.poll() is None:
                demo.send_signal(signal.SIGINT)
                try:
                    demo.wait(60)
                except subprocess.TimeoutExpired:
                    demo.kill()


def test_demo_rotates_due_keys_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Within 60 s the demo rotates every due production key; Ctrl-C says what it stops and leaves
    no process or port behind."""
    home = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with rotating_demo(home, out) as demo:
        # The command the banner gives works as printed, from a shell where no virtualenv is active.
        [told] = re.findall(r"in another terminal: (.+)", out.read_text())
        status = subprocess.run(told, shell=True, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                env={**os.environ, "PATH": "/usr/bin:/bin"})  # a new terminal, elsewhere
        assert status.returncode == 0 and "acme" in status.stdout + status.stderr, (told, status.stderr[-500:])
    output = out.read_text()
    assert demo.returncode == 0, output
    assert len(_succeeded(output)) == 3, output  # the seed has three due production keys
    assert "Ctrl-C: stopping the worker and beat" in output
    assert "stopped: worker, beat, Redis and the emulator" in output
    redis_url = next(line for line in (home / "rotator.toml").read_text().splitlines() if "redis_url" in line)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
    files = list((home / "secrets").rglob("*.secret"))
    assert len(files) == 3 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)


def test_a_second_demo_run_finds_its_first_runs_files_its_own(tmp_path: Path) -> None:
    """The demo's keys keep their ids from run to run, so the files a first run stored belong to
    keys the second run's emulator has again: rotated over, never reported as orphans."""
    home = tmp_path / "demo"
    for run in (1, 2):
        out = tmp_path / f"demo-{run}.out"
        with rotating_demo(home, out) as demo:
            if run == 2:
                config = str(home / "rotator.toml")
                report = subprocess.run([sys.executable, "-m", "rotator.cli", "reconcile", "--json", "--config", config],
                                        capture_output=True, text=True, timeout=60)
        assert demo.returncode == 0 and len(_succeeded(out.read_text())) == 3, out.read_text()[-2000:]
    assert json.loads(report.stdout)["orphans"] == [], report.stdout[-2000:]
    assert len(list((home / "secrets").rglob("*.secret"))) == 3


def test_a_closed_terminal_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    """SIGHUP (the terminal went away): the demo stops its worker, beat, Redis and emulator too."""
    home = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "rotator.cli", "demo", "--plain", "--home", str(home)],
                                stdout=sink, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 60
            while "worker log:" not in out.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)  # the worker and beat are starting
            demo.send_signal(signal.SIGHUP)
            demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert "stopped: worker, beat, Redis and the emulator" in out.read_text(), out.read_text()
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def _succeeded(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip().startswith("succeeded")]


def test_demo_seed_has_every_state() -> None:
    """The demo seed shows due, due-soon and young keys, the Auto-generated key and a sandbox."""
    emulator = Emulator()
    emulator.load_seed(json.loads(SEED.read_text()))
    from rotator.keyservice.emulator_http import EmulatorServer
    from rotator.keyservice.http import HttpKeyService

    with EmulatorServer(emulator) as server, HttpKeyService(server.url, emulator.token) as service:
        rows = list(scan(service, Policy(), time.time()))
    states = [r.state.value for r in rows]
    assert states.count("due") == 3 and "due_soon" in states and "ok" in states and "out_of_scope" in states
    assert any(r.key.is_auto_generated and r.state.value == "due" for r in rows)


def test_demo_with_vault_stores_into_a_real_openbao_read_back_with_bao(tmp_path: Path) -> None:
    """`demo --vault`: the secrets land in a private OpenBao under AppRole and the least-privilege
    policy; the command the demo prints (`bao kv get`, the root token from its 0600 file) reads
    each back, the same secret the encrypted file holds; Ctrl-C stops OpenBao too."""
    from cryptography.fernet import Fernet

    home = tmp_path / "demo"
    out = tmp_path / "demo.out"
    with rotating_demo(home, out, "--vault") as demo:
        shown = out.read_text()  # while the demo (and its OpenBao) still runs
        command = next(line.strip() for line in shown.splitlines() if " kv get -mount=" in line)
        fernet = Fernet((home / "file.key").read_bytes())
        read = []
        for file in sorted((home / "secrets").rglob("*.secret")):
            doc = json.loads(fernet.decrypt(file.read_bytes()))
            line = command.replace("<client_id>", doc["client_id"]).replace("<key_id>", doc["key_id"])
            answer = subprocess.run(["bash", "-c", line.replace(" kv get ", " kv get -format=json ", 1)],
                                    capture_output=True, text=True, timeout=30)
            assert answer.returncode == 0, answer.stderr
            stored = json.loads(answer.stdout)["data"]
            assert stored["data"]["api_key"] == doc["api_key"]
            assert set(stored["metadata"]["custom_metadata"]) == {"attempt_id", "fingerprint", "key_reset_at",
                                                                 "rotated_at"}
            read.append(doc["key_id"])
    output = out.read_text()
    assert demo.returncode == 0, output
    assert len(_succeeded(output)) == 3 and len(read) == 3, output
    assert "stopped: worker, beat, Redis, OpenBao and the emulator" in output
    assert (home / "openbao-root.token").stat().st_mode & 0o777 == 0o600
    assert (home / "openbao-root.token").read_text() not in output
    port = int(re.search(r"OpenBao \(a real Vault API\): http://127\.0\.0\.1:(\d+)", output).group(1))  # type: ignore[union-attr]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_a_private_redis_never_adopts_another_redis_on_its_port() -> None:
    """The port a PrivateRedis chose was free, not reserved: when another Redis holds it by the time
    its own starts, it moves to another port instead of taking the other one for its own (four test
    processes start Redis servers at once)."""
    import redis

    from rotator.embedded import PrivateRedis, _answering_pid

    with PrivateRedis() as first:
        second = PrivateRedis()
        second.port = first.port  # as if `first` had taken it between the choice and the start
        second.start()
        try:
            assert second.port != first.port
            assert _answering_pid(second.port) != _answering_pid(first.port)
            redis.Redis.from_url(second.url).set("whose", "second")
            assert redis.Redis.from_url(first.url).get("whose") is None
        finally:
            second.stop()
