"""The plan says what --apply would do; out-of-scope keys need two flags; services that do not
answer are one line; piped tables keep whole values."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from tests.conftest import write_config

runner = CliRunner()
DAY = 86_400


@pytest.fixture
def setup(tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator,
          emulator_server: EmulatorServer) -> tuple[Path, dict[str, str]]:
    now = emulator.now()
    client = f"acme-{uuid.uuid4().hex[:6]}"
    sandbox = f"play-{uuid.uuid4().hex[:6]}"
    due = next(iter(emulator.add_client(client, created_at=now - 400 * DAY).keys))
    young = emulator.add_key(client, "young", created_at=now - 12 * DAY).id
    old_sandbox = next(iter(emulator.add_client(sandbox, environment="SANDBOX", created_at=now - 400 * DAY).keys))
    env.setenv("ROTATOR_STATE__NAMESPACE", f"plan-{uuid.uuid4().hex[:8]}")
    path = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server, clients=[client, sandbox])
    return path, {"client": client, "sandbox": sandbox, "due": due, "young": young, "old_sandbox": old_sandbox}


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_the_plan_looks_each_key_up(setup: tuple[Path, dict[str, str]], emulator: Emulator) -> None:
    """Not due, no such key, out of scope: the plan says so (and how), and changes nothing."""
    path, k = setup
    code, out, _ = run("rotate", "--client-id", k["client"], "--key-id", k["young"], "--config", str(path))
    assert code == 0 and "would skip" in out and "not due (age 12.0 d; due " in out and "add --force" in out
    code, out, _ = run("rotate", "--client-id", k["client"], "--key-id", k["young"], "--force", "--json",
                       "--config", str(path))
    assert code == 0 and json.loads(out)["plan"][0]["action"] == "rotate"
    code, out, _ = run("rotate", "--client-id", k["client"], "--key-id", "key_nope", "--config", str(path))
    assert code == 1 and "would refuse" in out and "no such key" in out
    code, out, _ = run("rotate", "--client-id", k["sandbox"], "--key-id", k["old_sandbox"], "--force",
                       "--config", str(path))
    assert code == 1 and "would refuse" in out and "SANDBOX" in out and "--include-out-of-scope" in out
    assert emulator.ledger == []


def test_force_does_not_rotate_an_out_of_scope_key(setup: tuple[Path, dict[str, str]], emulator: Emulator) -> None:
    """--force alone refuses a SANDBOX key (exit 1, nothing reset, the refusal in the history);
    --force --include-out-of-scope rotates it; the second flag alone is a usage error."""
    path, k = setup
    one = ("--client-id", k["sandbox"], "--key-id", k["old_sandbox"], "--config", str(path))
    code, out, _ = run("rotate", *one, "--apply")
    assert code == 1 and "SANDBOX" in out
    code, out, _ = run("rotate", *one, "--apply", "--force")
    assert code == 1 and "failed" in out and "SANDBOX" in out
    assert emulator.ledger == []
    assert run("rotate", *one, "--apply", "--include-out-of-scope")[0] == 2
    code, out, _ = run("rotate", *one, "--apply", "--force", "--include-out-of-scope", "--reason", "drill")
    assert code == 0 and "succeeded" in out
    assert len(emulator.ledger) == 1
    code, out, _ = run("status", "--history", "--json", "--config", str(path))
    statuses = [(e.get("key_id"), e.get("status")) for e in json.loads(out)["history"] if e["kind"] == "rotation"]
    assert (k["old_sandbox"], "failed") in statuses and (k["old_sandbox"], "succeeded") in statuses


def test_an_unknown_key_applied_is_in_the_history(setup: tuple[Path, dict[str, str]]) -> None:
    path, k = setup
    code, _, _ = run("rotate", "--client-id", k["client"], "--key-id", "key_nope", "--apply", "--reason", "typo",
                     "--config", str(path))
    assert code == 1
    code, out, _ = run("status", "--history", "--json", "--config", str(path))
    [entry] = [e for e in json.loads(out)["history"] if e.get("key_id") == "key_nope"]
    assert entry["status"] == "failed" and entry["note"] == "typo" and entry["actor"]


def test_enqueue_without_apply_says_it_sent_nothing(setup: tuple[Path, dict[str, str]]) -> None:
    path, _ = setup
    code, out, err = run("rotate", "--all-due", "--enqueue", "--config", str(path))
    assert code == 0 and "would rotate" in out and "add --apply --enqueue to send them to the workers" in err


@pytest.mark.parametrize("command", [("status",), ("status", "--history"), ("reconcile",), ("reconcile", "--repair"),
                                     ("rotate", "--all-due", "--apply")])
def test_a_dead_redis_is_one_line(setup: tuple[Path, dict[str, str]], env: pytest.MonkeyPatch,
                                  command: tuple[str, ...]) -> None:
    """Every command that needs Redis fails like `scan` does without its key service: one line, exit 1."""
    path, _ = setup
    env.setenv("ROTATOR_STATE__REDIS_URL", "redis://:hunter2@127.0.0.1:9/0")
    result = runner.invoke(app, [*command, "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Redis did not answer"), result.stderr
    assert "Traceback" not in result.output and "hunter2" not in result.output


def test_a_dead_broker_is_one_line(setup: tuple[Path, dict[str, str]], env: pytest.MonkeyPatch) -> None:
    """In a process of its own: Celery's configuration is read once per process."""
    path, _ = setup
    env.setenv("ROTATOR_CELERY__BROKER_URL", "redis://127.0.0.1:9/1")
    result = subprocess.run([sys.executable, "-m", "rotator.cli", "rotate", "--all-due", "--apply", "--enqueue",
                             "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "did not answer" in result.stderr and "Traceback" not in result.stderr


def test_piped_tables_keep_whole_values(setup: tuple[Path, dict[str, str]]) -> None:
    """Not a terminal: tab-separated rows, nothing cut to 80 columns (grep finds the whole id)."""
    path, k = setup
    code, out, _ = run("scan", "--config", str(path))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split("\t") == ["client_id", "key_id", "alias", "environment", "age_days", "state"]
    assert [k["client"], k["due"], "Auto-generated key", "PRODUCTION", "400.0", "due"] in [r.split("\t") for r in rows]
    assert run("rotate", "--all-due", "--apply", "--reason", "quarterly", "--config", str(path))[0] == 0
    code, out, _ = run("status", "--history", "--config", str(path))
    assert f"{k['client']}/{k['due']}\tAuto-generated key\t" in out
    [entry] = [line for line in out.splitlines() if "quarterly" in line and "\trotation\t" in line]
    assert "sinks memory:default: ok" in entry or "sinks memory" in entry


def test_events_in_human_output_are_readable_lines(setup: tuple[Path, dict[str, str]], emulator: Emulator,
                                                   env: pytest.MonkeyPatch) -> None:
    """`reconcile` with drift: its event is a readable line, not JSON, unless ROTATOR_LOG_FORMAT=json."""
    path, k = setup
    assert run("rotate", "--all-due", "--apply", "--config", str(path))[0] == 0
    emulator.clock_offset_s = 10
    emulator.reset_key(k["client"], k["due"], None)  # behind rotator's back
    code, out, err = run("reconcile", "--config", str(path))
    assert code == 1 and f"drift {k['client']}/{k['due']}" in out
    assert "drift.detected" in err and not any(line.lstrip().startswith("{") for line in err.splitlines())
    env.setenv("ROTATOR_LOG_FORMAT", "json")
    code, _, err = run("reconcile", "--config", str(path))
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert code == 1 and [e["event"] for e in events] == ["drift.detected"] and events[0]["level"] == "critical"


def test_health_probe(setup: tuple[Path, dict[str, str]], env: pytest.MonkeyPatch) -> None:
    """Redis and the broker answer: exit 0. No worker on this host: --worker exits 1 and says so.
    A dead Redis: exit 1, named. (The live worker's answer is checked in test_celery.)"""
    path, _ = setup
    code, _, err = run("health", "--config", str(path))
    assert code == 0 and "ok   state redis" in err and "ok   celery broker" in err
    code, _, err = run("health", "--worker", "--node", "celery@nowhere-here", "--config", str(path))
    assert code == 1 and "fail worker celery@nowhere-here: no heartbeat within" in err
    env.setenv("ROTATOR_STATE__REDIS_URL", "redis://127.0.0.1:9/0")
    code, _, err = run("health", "--config", str(path))
    assert code == 1 and "fail state redis: ConnectionError" in err


def test_reconcile_reports_sink_entries_of_keys_that_are_gone(setup: tuple[Path, dict[str, str]],
                                                              emulator: Emulator) -> None:
    """A key revoked after rotator stored its secret: `reconcile` names the orphaned entry (a dead
    secret, left for a person to delete) without failing; nothing is deleted."""
    path, k = setup
    one = ("--client-id", k["client"], "--key-id", k["young"], "--config", str(path))
    assert run("rotate", *one, "--apply", "--force")[0] == 0
    emulator.revoke_key(k["client"], k["young"])
    code, out, err = run("reconcile", "--config", str(path))
    assert code == 0, out + err
    assert f"orphan memory:default/{k['client']}/{k['young']}: {k['client']}/{k['young']} is no longer" in out
    assert "1 orphaned sink entries" in err
    code, out, _ = run("reconcile", "--json", "--config", str(path))
    assert json.loads(out)["orphans"] == [{"sink": "memory:default", "where": f"memory:default/{k['client']}/{k['young']}",
                                           "client_id": k["client"], "key_id": k["young"]}]


def test_a_forced_rotation_of_unmoved_dates_resets_for_real(setup: tuple[Path, dict[str, str]],
                                                            emulator: Emulator) -> None:
    """Two resets within one second leave LastResetDate where it was: a third forced rotation must
    not send the second one's Idempotency-Key (its answer would be replayed and the old secret keep
    working while `succeeded` is printed); it resets for real, under a new key."""
    path, k = setup
    frozen = float(emulator.now())
    emulator._clock = lambda: frozen  # the key service's clock stands still: every reset in one second
    one = ("--client-id", k["client"], "--key-id", k["young"], "--apply", "--force", "--config", str(path))
    for expected in (1, 2, 3):
        code, out, _ = run("rotate", *one)
        assert code == 0 and "succeeded" in out, out
        assert len([e for e in emulator.ledger if e.key_id == k["young"]]) == expected


def test_repair_never_resets_an_excluded_key(setup: tuple[Path, dict[str, str]], emulator: Emulator,
                                             env: pytest.MonkeyPatch) -> None:
    """An excluded key reset behind rotator's back: `reconcile --repair` leaves it alone (a person
    manages it), without a reset and without failing."""
    path, k = setup
    assert run("rotate", "--client-id", k["client"], "--key-id", k["young"], "--apply", "--force",
               "--config", str(path))[0] == 0
    emulator.clock_offset_s = 10
    emulator.reset_key(k["client"], k["young"], "out-of-band-reset-0001")
    resets = len(emulator.ledger)
    env.setenv("ROTATOR_POLICY__EXCLUDE", f'["{k["client"]}/{k["young"]}"]')
    code, out, err = run("reconcile", "--repair", "--json", "--config", str(path))
    assert code == 0, out + err
    assert len(emulator.ledger) == resets and json.loads(out)["drift"] == []
