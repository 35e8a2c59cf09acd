"""`rotator scan` against a seeded emulator over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer

runner = CliRunner()

SEED = {
    "clients": [
        {"client_id": "acme-prod", "environment": "PRODUCTION", "keys": [
            {"id": "key_auto", "alias": "Auto-generated key", "auto_generated": True,
             "created_days_ago": 400, "reset_days_ago": 120},
            {"id": "key_soon", "alias": "payouts", "created_days_ago": 80},
            {"id": "key_young", "alias": "reports", "created_days_ago": 900, "reset_days_ago": 1},
            {"id": "key_legacy", "alias": "legacy", "created_days_ago": 500},
        ]},
        {"client_id": "acme-sbx", "environment": "SANDBOX", "keys": [
            {"id": "key_sbx", "alias": "Auto-generated key", "auto_generated": True,
             "created_days_ago": 300},
        ]},
    ]
}


def config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(f"""
[keyservice]
url = "{url}"
[policy]
exclude = ["acme-prod/key_legacy"]
{extra}
[[sinks]]
kind = "memory"
""")
    return path


def test_scan_json_gives_each_keys_state(
    tmp_path: Path, env: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """Production due, due soon, ok, excluded; sandbox out of scope; stdout is one JSON array."""
    emulator.load_seed(SEED)
    result = runner.invoke(app, ["scan", "--json", "--config", str(config(tmp_path, emulator_server.url))])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    states = {r["key_id"]: r["state"] for r in rows}
    assert states == {"key_auto": "due", "key_soon": "due_soon", "key_young": "ok",
                      "key_legacy": "excluded", "key_sbx": "out_of_scope"}
    auto = next(r for r in rows if r["key_id"] == "key_auto")
    assert auto["age_days"] == pytest.approx(120, abs=0.01)
    assert set(auto) >= {"client_id", "key_id", "alias", "environment", "age_days", "state"}


def test_scan_limited_to_configured_clients(
    tmp_path: Path, env: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """`keyservice.clients` limits the scan to those Client IDs."""
    emulator.load_seed(SEED)
    path = config(tmp_path, emulator_server.url)
    path.write_text(path.read_text().replace("[policy]", '[policy]').replace(
        f'url = "{emulator_server.url}"', f'url = "{emulator_server.url}"\nclients = ["acme-sbx"]'))
    result = runner.invoke(app, ["scan", "--json", "--config", str(path)])
    assert [r["client_id"] for r in json.loads(result.stdout)] == ["acme-sbx"]


def test_scan_table_for_people(
    tmp_path: Path, env: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer
) -> None:
    """Without --json a table lists every key and a summary counts the states."""
    emulator.load_seed(SEED)
    result = runner.invoke(app, ["scan", "--config", str(config(tmp_path, emulator_server.url))])
    assert result.exit_code == 0
    assert "key_auto" in result.stdout and "due_soon" in result.stdout
    assert "1 due" in result.stderr


def test_scan_unreachable_service_exits_1(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    """A key service that does not answer is a clear error and exit code 1."""
    path = config(tmp_path, "http://127.0.0.1:9")
    path.write_text(path.read_text().replace("[policy]", "[policy]") + "")
    env.setenv("ROTATOR_KEYSERVICE__MAX_ATTEMPTS", "1")
    result = runner.invoke(app, ["scan", "--json", "--config", str(path)])
    assert result.exit_code == 1
    assert "GET /v2.01/clients: connection failed" in result.stderr
    assert result.stdout == ""


def test_in_process_emulator_kind(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    """`kind = "emulator"` serves a seeded emulator inside the process; scan reads it."""
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(SEED))
    path = tmp_path / "rotator.toml"
    path.write_text(f'[keyservice]\nkind = "emulator"\nseed = "{seed}"\n[[sinks]]\nkind = "memory"\n')
    result = runner.invoke(app, ["scan", "--json", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert {r["key_id"] for r in json.loads(result.stdout)} == {
        "key_auto", "key_soon", "key_young", "key_legacy", "key_sbx"}
