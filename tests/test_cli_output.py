"""Terminal-safe CLI output: values from outside are shown as text (no rich markup, no emoji codes,
no control characters) in tables and lines, and `--json` stays exact."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotator import cli
from rotator.cli import app
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from tests.hostile_server import TOKEN, LyingKeyService, RawServer

runner = CliRunner()
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
DAY = 86_400


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide consoles, so a table cell is not wrapped in the middle of what the test looks for."""
    monkeypatch.setattr(cli.out, "width", 400)
    monkeypatch.setattr(cli.err, "width", 400)


def lying(lie: str) -> Iterator[tuple[LyingKeyService, RawServer]]:
    service = LyingKeyService(lie)
    with RawServer(service.handle) as server:
        yield service, server


def config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(f'[keyservice]\nurl = "{url}"\nmax_attempts = 1\n{extra}\n[[sinks]]\nkind = "memory"\n')
    return path


@pytest.fixture
def markup_service() -> Iterator[tuple[LyingKeyService, RawServer]]:
    yield from lying("alias_markup")


def test_scan_shows_markup_aliases_as_text(tmp_path: Path, env: pytest.MonkeyPatch, wide: None,
                                           markup_service: tuple[LyingKeyService, RawServer]) -> None:
    """`[/bold]` used to crash scan with MarkupError; `[link=…]` rendered a link. Both are text now."""
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    _, server = markup_service
    result = runner.invoke(app, ["scan", "--config", str(config(tmp_path, server.url))])
    assert result.exit_code == 0, result.output
    assert "[/bold]" in result.stdout
    assert "[link=https://evil.example/]click me[/link]" in result.stdout
    assert not CONTROL.search(result.stdout + result.stderr)


def test_scan_json_keeps_aliases_exact(tmp_path: Path, env: pytest.MonkeyPatch,
                                       markup_service: tuple[LyingKeyService, RawServer]) -> None:
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    _, server = markup_service
    result = runner.invoke(app, ["scan", "--json", "--config", str(config(tmp_path, server.url))])
    assert result.exit_code == 0, result.output
    aliases = {r["key_id"]: r["alias"] for r in json.loads(result.stdout)}
    assert aliases == {"key_due": "[/bold]", "key_young": "[link=https://evil.example/]click me[/link]"}


def test_scan_with_terminal_escapes_in_an_alias_prints_none(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    """Clear-screen, title and bell codes in an alias: the adapter refuses the alias, and nothing of
    it reaches the terminal raw."""
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    for _, server in lying("alias_escapes"):
        result = runner.invoke(app, ["scan", "--config", str(config(tmp_path, server.url))])
        assert result.exit_code == 1
        assert "'Alias' contains control characters" in result.stderr
        assert not CONTROL.search(result.stdout + result.stderr)


def test_status_history_shows_a_hostile_reason_as_text(
    tmp_path: Path, env: pytest.MonkeyPatch, wide: None, redis_server: str, emulator: Emulator,
    emulator_server: EmulatorServer,
) -> None:
    """An operator's --reason (or any stored text) with escapes and markup: shown as plain text."""
    key_id = next(iter(emulator.add_client("acme", created_at=emulator.now() - 400 * DAY).keys))
    env.setenv("ROTATOR_STATE__NAMESPACE", f"out-{uuid.uuid4().hex[:8]}")
    path = config(tmp_path, emulator_server.url,
                  f'[state]\nredis_url = "{redis_server}/0"\n[celery]\nbroker_url = "{redis_server}/1"')
    reason = "\x1b]0;pwned\x07\x1b[2J[bold red]urgent[/] :warning: \x9b31m"
    result = runner.invoke(app, ["rotate", "--client-id", "acme", "--key-id", key_id, "--apply", "--force",
                                 "--reason", reason, "--config", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["status", "--history", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "[bold red]urgent[/] :warning:" in result.stdout
    assert not CONTROL.search(result.stdout + result.stderr)
    result = runner.invoke(app, ["status", "--history", "--json", "--config", str(path)])
    assert reason in [e.get("note") for e in json.loads(result.stdout)["history"]]


def test_errors_are_shown_without_control_characters(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    """A key service error whose Message carries escapes and markup: one plain line, exit 1."""
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", "wrong-token")
    for _, server in lying("error_echo"):
        result = runner.invoke(app, ["scan", "--config", str(config(tmp_path, server.url))])
        assert result.exit_code == 1
        assert "401" in result.stderr
        assert not CONTROL.search(result.stdout + result.stderr)
        assert len(result.stderr) < 1000


def test_processes_sharing_stderr_never_merge_their_log_lines(tmp_path: Path) -> None:
    """A worker's prefork children write to one stderr: each JSON line must reach it whole (a
    line and its newline written apart let another process's line in between: 2,336 of 12,000
    lines broke so)."""
    import os
    import subprocess
    import sys

    code = ("from rotator import logs\nlogs.configure('INFO')\nlog = logs.get('t')\n"
            "for i in range(3000):\n    log.info('line', pad='x' * 600, n=i)\n")
    out = tmp_path / "shared.log"
    with out.open("wb") as shared:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=shared, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(4)]
        assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = out.read_text().splitlines()
    assert len(lines) == 12_000 and all(json.loads(line)["event"] == "line" for line in lines)
