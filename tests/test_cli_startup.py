"""What the commands a person or a script runs often import: only what they use. Celery, boto3,
hvac, the web stack, Apprise and the rotation engine stay out of `scan`, `health` and
`check-config`, each run as an operator runs it, in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rotator.keyservice.emulator_http import EmulatorServer
from tests.conftest import write_config

# Runs the CLI as `rotator …` does, then writes every module it imported (after its output).
REPORTING = """
import atexit, json, runpy, sys
listing = sys.argv[1]
atexit.register(lambda: open(listing, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["rotator", *sys.argv[2:]]
runpy.run_module("rotator.cli", run_name="__main__")
"""

# Top-level packages (or rotator's own modules) none of these commands uses.
NEVER = ("celery", "kombu", "billiard", "boto3", "botocore", "hvac", "starlette", "uvicorn", "apprise",
         "prometheus_client", "structlog", "rotator.engine", "rotator.tasks", "rotator.web", "rotator.alerts")


def imported(tmp_path: Path, *command: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    listing = tmp_path / "modules.json"
    ran = subprocess.run([sys.executable, "-c", REPORTING, str(listing), *command], capture_output=True, text=True,
                         timeout=60)
    return ran, set(json.loads(listing.read_text()))


def used(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.mark.parametrize("command", [["scan", "--json"], ["health"], ["check-config"]])
def test_a_command_imports_only_what_it_uses(command: list[str], tmp_path: Path, emulator_server: EmulatorServer,
                                              redis_server: str, env: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server)
    ran, modules = imported(tmp_path, *command, "--config", str(config))
    assert ran.returncode == 0, ran.stderr
    assert [name for name in NEVER if used(modules, name)] == []
    assert used(modules, "rotator.config")  # it read its configuration as every command does
    if command[0] == "scan":
        assert json.loads(ran.stdout) == []  # the emulator has no keys: the command did run
