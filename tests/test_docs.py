"""Documentation that follows the code: the configuration reference, examples, compose file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rotator.config import AlertConfig, ReloadConfig, Settings
from rotator.reference import render
from rotator.sinks import registry

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is exactly what `rotator config-reference` prints now."""
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), \
        "run: rotator config-reference > docs/configuration.md"


def test_every_setting_is_in_the_reference() -> None:
    """Every key of every section, sink kind, alert entry and reload hook appears in the reference."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    models = [f.annotation for n, f in Settings.model_fields.items() if n not in ("sinks", "alerts", "reload")]
    models += [registry.resolve(k).Config for k in registry.BUILTIN] + [AlertConfig, ReloadConfig]
    for model in models:
        for name in model.model_fields:  # type: ignore[union-attr]
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing"  # type: ignore[union-attr]


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_examples_validate(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example config passes the same validation as `check-config` (credentials stubbed)."""
    from rotator.config import settings_from_mapping

    data = tomllib.loads(example.read_text())
    env = {"ROTATOR_KEYSERVICE_TOKEN": "x", "ROTATOR_FINGERPRINT_KEY": "x" * 32, "ROTATOR_IDEMPOTENCY_KEY": "i" * 32,
           "VAULT_TOKEN": "x",
           "VAULT_ROLE_ID": "x", "VAULT_SECRET_ID": "x", "ROTATOR_FILE_KEY": "x", "ROTATOR_WEBHOOK_SECRET": "x",
           "AWS_REGION": "eu-west-1", "ROTATOR_REDIS_PASSWORD": "x",
           "ROTATOR_RABBITMQ_PASSWORD": "x", "ROTATOR_ALERT_SLACK_URL": "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrI/",
           "ROTATOR_ALERT_MAIL_URL": "mailtos://alerts:pw@smtp.example.com?to=oncall@example.com"}
    settings_from_mapping(data, source=str(example), environ=env)


def test_readme_commands_exist() -> None:
    """The README's two commands are the ones dev.py and .ci/run implement."""
    readme = (ROOT / "README.md").read_text()
    assert "python3 dev.py demo" in readme and "python3 dev.py test" in readme
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()


def test_compose_file_is_valid() -> None:
    """`docker compose config` (or docker-compose) accepts docker-compose.yml."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no docker-compose binary on this machine")
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_compose_publishes_nothing_beyond_loopback_and_signs_its_messages() -> None:
    """No port of docker-compose.yml on all interfaces, no Flower (one more broker client that would
    show nothing with remote control off), no credential in the file: the one-shot `keys` service
    generates the signing key, the Redis password, the Vault dev token and the emulator's token;
    Redis's default user is off; worker and beat sign with the key and start once it is made."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "flower" not in services
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    made = services["keys"]["entrypoint"][-1]
    assert "rotator keys init /run/rotator-keys --signer fleet" in made and "umask 077" in made
    for generated in ("redis.password", "redis-view.password", "vault-dev.token", "keyservice.token"):
        assert generated in made
    text = (ROOT / "docker-compose.yml").read_text()
    for literal in ("dev-token", "VAULT_TOKEN: root", "VAULT_DEV_ROOT_TOKEN_ID:", "change-me", "--requirepass"):
        assert literal not in text, literal  # no credential written in the file
    redis_command = services["redis"]["command"][-1]
    assert "--user default off" in redis_command
    from tests.test_readonly import acl_lines

    for line in acl_lines():  # the users docs/operations.md gives, with the generated passwords
        name, rest = line.removeprefix("ACL SETUSER ").split(" ", 1)
        rules = re.sub(r"^on ><[^>]*> ", "", rest)
        assert f"--user {name} on" in redis_command and rules.replace("~*", "'~*'").replace(
            "&*", "'&*'").replace("~rotator:*", "'~rotator:*'") in redis_command, name
    for name in ("worker", "beat"):
        env = services[name]["environment"]
        assert env["ROTATOR_SIGNING__PRIVATE_KEY_FILE"].startswith("/run/rotator-keys/")
        assert env["ROTATOR_SIGNING__PRIVATE_KEY_FILE"].endswith(f"/{env['ROTATOR_SIGNING__NAME']}.ed25519")
        assert services[name]["depends_on"]["keys"] == {"condition": "service_completed_successfully"}


def every_command() -> list[list[str]]:
    """Every command and group of the CLI, as the arguments that name it ([] is the top level)."""
    import typer

    from rotator.cli import app

    found: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        found.append(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def help_of(path: list[str]) -> str:
    import typer

    from rotator.cli import app

    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return (command.help or "").replace("\\[", "[")


def test_help_says_where_the_configuration_comes_from() -> None:
    """`rotator --help` names --config (no command would otherwise say it exists before one is
    picked), and `python3 dev.py --help` is help, not a usage error."""
    from typer.testing import CliRunner

    from rotator.cli import app

    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0 and "--config FILE" in top.stdout and "rotator keys init DIR" in top.stdout
    for command in every_command():
        shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).stdout
        # A flag takes no value (`--apply`, never `--apply true`), and no option shows a Python type.
        noise = [line for line in shown.splitlines() if "<bool>" in line or "<list[" in line]
        assert noise == [], (command, noise)
        # Square brackets in a help text are shown, not eaten as markup (`[signing.trusted]` was).
        for bracketed in re.findall(r"\[[a-z][a-z_.]*\]", help_of(command)):
            assert bracketed in " ".join(shown.split()), (command, bracketed)
    for flag in ("--help", "-h", "help"):
        dev = subprocess.run([sys.executable, str(ROOT / "dev.py"), flag], capture_output=True, text=True, timeout=30)
        assert dev.returncode == 0 and "python3 dev.py test" in dev.stdout, (flag, dev.stderr)
