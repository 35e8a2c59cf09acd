"""The operator's commands in one process: ping, plan, apply, force, status, reconcile, exit codes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from tests.conftest import write_config

runner = CliRunner()
DAY = 86_400


@pytest.fixture
def setup(tmp_path: Path, env: pytest.MonkeyPatch, redis_server: str, emulator: Emulator,
          emulator_server: EmulatorServer) -> tuple[Path, dict[str, str]]:
    now = emulator.now()
    auto = next(iter(emulator.add_client("acme", created_at=now - 400 * DAY).keys))
    young = emulator.add_key("acme", "young", created_at=now - 5 * DAY).id
    env.setenv("ROTATOR_STATE__NAMESPACE", f"cli-{uuid.uuid4().hex[:8]}")
    return write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server), {"due": auto, "young": young}


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_check_config_ping_reaches_every_service(setup: tuple[Path, dict[str, str]]) -> None:
    """--ping reports each service; all answer, exit 0."""
    path, _ = setup
    code, _, err = run("check-config", "--ping", "--config", str(path))
    assert code == 0, err
    assert "ok   keyservice http" in err and "ok   state redis" in err and "ok   memory:default" in err
    assert "ok   sink places" in err


def test_check_config_ping_fails_for_a_dead_redis(setup: tuple[Path, dict[str, str]], env: pytest.MonkeyPatch) -> None:
    """An unreachable Redis makes --ping exit 1 with the service named."""
    path, _ = setup
    env.setenv("ROTATOR_STATE__REDIS_URL", "redis://127.0.0.1:9/0")
    code, _, err = run("check-config", "--ping", "--config", str(path))
    assert code == 1 and "fail state redis" in err


def test_plan_apply_force_and_their_exit_codes(setup: tuple[Path, dict[str, str]], emulator: Emulator) -> None:
    """A plan changes nothing; --apply rotates the due key; a young key needs --force; no secret printed."""
    path, keys = setup
    code, out, _ = run("rotate", "--all-due", "--json", "--config", str(path))
    assert code == 0 and json.loads(out) == {"applied": False, "plan": [
        {"client_id": "acme", "key_id": keys["due"], "action": "rotate", "reason": "due (age 400.0 d)",
         "age_days": 400.0}]}
    assert emulator.ledger == []
    code, out, _ = run("rotate", "--all-due", "--apply", "--json", "--reason", "quarterly", "--config", str(path))
    assert code == 0 and json.loads(out)["results"][0]["status"] == "succeeded"
    assert emulator.current_secret("acme", keys["due"]) not in out
    code, out, _ = run("rotate", "--client-id", "acme", "--key-id", keys["young"], "--apply", "--json",
                       "--config", str(path))
    assert code == 0 and json.loads(out)["results"][0]["reason"].startswith("not due (age 5.0 d; due ")
    code, out, _ = run("rotate", "--client-id", "acme", "--key-id", keys["young"], "--apply", "--force",
                       "--config", str(path))
    assert code == 0 and "succeeded" in out
    assert len(emulator.ledger) == 2
    code, out, _ = run("status", "--json", "--history", "--config", str(path))
    report = json.loads(out)
    notes = [e["note"] for e in report["history"] if e["kind"] == "rotation"]
    assert "quarterly" in notes and all(e["actor"] for e in report["history"])
    for key_id in keys.values():
        assert emulator.current_secret("acme", key_id) not in out


def test_unknown_key_fails_with_exit_1(setup: tuple[Path, dict[str, str]]) -> None:
    """Rotating a key that does not exist is a clear failure, exit 1."""
    path, _ = setup
    code, out, _ = run("rotate", "--client-id", "acme", "--key-id", "key_nope", "--apply", "--config", str(path))
    assert code == 1 and "not found" in out


def test_bad_usage_exits_2(setup: tuple[Path, dict[str, str]]) -> None:
    """Neither --all-due nor a key: usage error, exit 2."""
    path, _ = setup
    assert run("rotate", "--config", str(path))[0] == 2
    assert run("rotate", "--all-due", "--client-id", "acme", "--key-id", "k", "--config", str(path))[0] == 2


def test_reconcile_detects_and_repairs_drift(setup: tuple[Path, dict[str, str]], emulator: Emulator,
                                             keyservice: HttpKeyService) -> None:
    """A reset behind rotator's back is drift (exit 1); --repair re-rotates and stores it (exit 0)."""
    path, keys = setup
    assert run("rotate", "--all-due", "--apply", "--config", str(path))[0] == 0
    assert run("reconcile", "--config", str(path))[0] == 0
    emulator.clock_offset_s = 10
    keyservice.reset_key("acme", keys["due"], "outside-reset-0000001")
    code, out, _ = run("reconcile", "--json", "--config", str(path))
    assert code == 1 and [d["key_id"] for d in json.loads(out)["drift"]] == [keys["due"]]
    code, out, _ = run("reconcile", "--repair", "--json", "--config", str(path))
    assert code == 0 and json.loads(out)["repaired"][0]["status"] == "succeeded"
    assert run("reconcile", "--config", str(path))[0] == 0
