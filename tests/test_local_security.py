"""Credentials and local files: check-config warns (never quoting the value) about credentials in URLs
and secrets pasted into `*_env`; URLs in logs are redacted; beat's schedule lives in a private
directory; metrics bind to 127.0.0.1; webhook timestamps are plain integers within ±300 s."""

from __future__ import annotations

import inspect
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotator import logs
from rotator.alerts.webhook import sign, verify_signature
from rotator.cli import app
from rotator.cli import services as cli
from rotator.keyservice.http import HttpKeyService
from rotator.safety import looks_like_secret, private_state_dir, redact_url, redact_urls_in
from tests.hostile_server import LyingKeyService, RawServer

runner = CliRunner()
PASTED = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"  # a token where a variable name belongs
ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(text + '\n[[sinks]]\nkind = "memory"\n')
    return path


# --- check-config ------------------------------------------------------------------------------

def test_credentials_in_urls_are_warned_about_without_the_value(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[keyservice]\nurl = "https://ops:tok3n-SECRET@keys.example.com"\n'
                           '[state]\nredis_url = "redis://:hunter2-SECRET@127.0.0.1:6379/0"\n'
                           '[celery]\nbroker_url = "redis://default:brok3r-SECRET@127.0.0.1:6379/1"\n')
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "SECRET" not in result.output
    for key in ("keyservice.url", "state.redis_url", "celery.broker_url"):
        assert f"{key}: the URL carries credentials" in result.stderr
    assert "ops:***@keys.example.com" in result.stderr and ":***@127.0.0.1:6379/0" in result.stderr


def test_a_secret_pasted_into_an_env_key_is_never_printed(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    """A token pasted where a variable name belongs: check-config fails (no such variable) and warns,
    and the token appears nowhere in its output."""
    path = write(tmp_path, f'[keyservice]\ntoken_env = "{PASTED}"\n')
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2
    assert "keyservice.token_env" in result.stderr and "the name looks like a secret" in result.stderr
    assert PASTED not in result.output and PASTED[4:20] not in result.output
    # one that is not even a valid name: refused by the pattern, still not echoed
    path = write(tmp_path, '[keyservice]\ntoken_env = "sk-live-9f8e7d6c5b4a3f2e1d0c"\n')
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2 and "9f8e7d6c5b4a" not in result.output


def test_a_secret_pasted_into_a_sink_env_key_is_never_printed(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rotator.toml"
    path.write_text(f'[[sinks]]\nkind = "file"\ndir = "{tmp_path}/s"\nkey_env = "{PASTED}"\n')
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 2 and "sinks[0].key_env" in result.stderr
    assert PASTED not in result.output


def test_a_set_secret_looking_env_name_still_gets_a_warning(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv(PASTED, "the-real-token")
    path = write(tmp_path, f'[keyservice]\ntoken_env = "{PASTED}"\n')
    result = runner.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "keyservice.token_env: does not look like an environment variable name" in result.stderr
    assert PASTED not in result.output


@pytest.mark.parametrize(("name", "secret"), [
    ("ROTATOR_KEYSERVICE_TOKEN", False), ("VAULT_TOKEN", False), ("ROTATOR_FILE_KEY", False),
    ("MY_APP_KEYSERVICE_TOKEN_PRODUCTION_EU_WEST_1", False), (PASTED, True), ("AKIAIOSFODNN7EXAMPLE", True),
    ("X9F3K2LQ8ZP4M7N1B6V5", True), ("lowercase_name", True), ("A" * 65, True),
])
def test_secret_looking_names(name: str, secret: bool) -> None:
    assert looks_like_secret(name) is secret


# --- URLs in logs and errors -----------------------------------------------------------------------

def test_redaction_of_urls() -> None:
    assert redact_url("https://user:token@keys.example.com/x") == "https://user:***@keys.example.com/x"
    assert redact_url("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("https://tokenonly@h/") == "https://***@h/"
    assert redact_url("https://keys.example.com/a@b") == "https://keys.example.com/a@b"
    assert redact_urls_in("GET http://u:p@h/x and redis://:s@r:1") == "GET http://u:***@h/x and redis://:***@r:1"


def test_url_credentials_never_reach_a_log_line(caplog: pytest.LogCaptureFixture,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """httpx logs every request's URL at INFO: with credentials in the key-service URL, the line
    shows `user:***@`; so do rotator's own structured lines."""
    logs.configure("INFO", json_lines=True)
    caplog.set_level(logging.INFO)
    service = LyingKeyService()
    try:
        with RawServer(service.handle) as server:
            url = server.url.replace("http://", "http://ops:tok3n-SECRET@")
            with HttpKeyService(url, "x", max_attempts=1) as ks, pytest.raises(Exception):
                list(ks.list_clients())
            logs.get("rotator.test").info("probe", url=url)
        out, err = capfd.readouterr()
        text = caplog.text + out + err
        assert "tok3n-SECRET" not in text
        assert "ops:***@127.0.0.1" in text
    finally:
        logs.configure("WARNING")


# --- beat's schedule ----------------------------------------------------------------------------

def test_private_state_dir_is_created_0700_and_refused_when_others_can_write(tmp_path: Path) -> None:
    directory = private_state_dir({"XDG_STATE_HOME": str(tmp_path / "state")})
    assert directory == tmp_path / "state" / "rotator"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    directory.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        private_state_dir({"XDG_STATE_HOME": str(tmp_path / "state")})
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "rotator").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="symlink"):
        private_state_dir({"XDG_STATE_HOME": str(tmp_path / "linked")})


def test_beat_schedule_is_not_in_the_shared_temp_dir(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    """celeryconf puts the schedule (a shelve: a pickle) in the private state directory; with a
    directory others can write there is none, and `rotator beat` refuses to start with the reason."""
    config = write(tmp_path, "")
    environ = {**os.environ, "ROTATOR_CONFIG": str(config), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    code = "import rotator.celeryconf as c; print(c.beat_schedule_filename)"
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == tmp_path / "xdg" / "rotator" and "/tmp/rotator-beat" not in str(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    (tmp_path / "xdg" / "rotator").chmod(0o777)
    result = subprocess.run([sys.executable, "-c", code + "; print(c.beat_schedule_problem)"], env=environ,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("\n")  # workers still start: no schedule
    assert "writable by group or others" in result.stdout
    beat = subprocess.run([sys.executable, "-m", "rotator.cli", "beat", "--config", str(config)], env=environ,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert beat.returncode == 2 and "writable by group or others" in beat.stderr  # beat refuses, clearly


def test_beat_refuses_a_schedule_in_a_shared_directory(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = runner.invoke(app, ["beat", "--config", str(write(tmp_path, "")), "--schedule", str(shared / "s")])
    assert result.exit_code == 2 and "writable by group or others" in result.stderr


# --- metrics and webhooks -------------------------------------------------------------------------

def test_metrics_bind_to_localhost_by_default() -> None:
    from rotator import metrics

    assert inspect.signature(cli.metrics).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli.worker).parameters["metrics_host"].default == "127.0.0.1"
    assert inspect.signature(metrics.serve).parameters["host"].default == "127.0.0.1"


NOW = 1_800_000_000


@pytest.mark.parametrize("timestamp", [f"+{NOW}", f"+0{NOW}", f"0{NOW}", f" {NOW}", f"{NOW} ", f"{NOW}\n",
                                       "1_800_000_000", "١٨٠٠٠٠٠٠٠٠", f"{NOW}.0", "-0", "", f"-{NOW}"])
def test_webhook_timestamp_must_be_a_plain_integer(timestamp: str) -> None:
    body = b'{"event": "x"}'
    signature = sign("s3cret", NOW, body)
    assert verify_signature("s3cret", str(NOW), body, signature, now=NOW)
    assert not verify_signature("s3cret", timestamp, body, signature, now=NOW)


def test_webhook_timestamp_window_is_300_seconds_either_way() -> None:
    body = b"{}"
    for delta, ok in ((0, True), (299, True), (300, True), (301, False), (-301, False), (3600, False)):
        ts = NOW - delta
        assert verify_signature("k", str(ts), body, sign("k", ts, body), now=NOW) is ok, delta
    ts = NOW - 1000
    assert not verify_signature("k", str(ts), body, sign("k", ts, body), now=NOW, tolerance_s=3600)
    assert verify_signature("k", str(int(time.time())), body, sign("k", int(time.time()), body))


def test_a_process_that_holds_secrets_writes_no_core_file() -> None:
    """`no_core_dumps` (called by worker, beat, run and every command that builds an engine): the
    core-file limit is 0 and, on Linux, the process is not dumpable; a forked child (Celery's pool)
    keeps both. A crash of that child writes no core."""
    script = """
import ctypes, os, resource, signal, sys
from rotator.safety import PR_GET_DUMPABLE, no_core_dumps
assert no_core_dumps() == []
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    ok = resource.getrlimit(resource.RLIMIT_CORE) == (0, 0) and libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    os.write(1, b"child " + (b"ok" if ok else b"dumpable") + b"\\n")
    os.kill(os.getpid(), signal.SIGSEGV)
_, status = os.waitpid(pid, 0)
print("parent", resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
      "core" if os.WCOREDUMP(status) else "no core", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child ok", "parent (0, 0) 0 no core"], done.stdout
