"""Key services are a registry like the sinks: `kind` resolves through the `rotator.keyservices`
entry points (the built-ins among them), a typo gets a "did you mean", and a third-party package
that registers its own kind is used as it is, with its own `[keyservice.options]`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from rotator.cli import app
from rotator.keyservice import registry
from rotator.keyservice.emulator import Emulator
from tests.conftest import FP_KEY, TOKEN

PLUGIN = '''
from rotator.keyservice.http import HttpKeyService

def build(config, grace_s):
    """A third party's adapter: here the HTTP one, configured from its own options."""
    import os
    return HttpKeyService(config.options["url"], os.environ[config.options["token_env"]])
'''


def test_the_built_in_kinds_are_registered_as_entry_points() -> None:
    from importlib.metadata import entry_points

    registered = {ep.name: ep.value for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert registered == registry.BUILTIN  # pyproject.toml and the table agree


def test_a_misspelt_kind_gets_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "rotator.toml"
    config.write_text('[keyservice]\nkind = "aws_iam"\n[[sinks]]\nkind = "memory"\n')
    result = CliRunner().invoke(app, ["check-config", "--config", str(config)], env={"ROTATOR_FINGERPRINT_KEY": FP_KEY})
    assert result.exit_code == 2
    assert "keyservice.kind: unknown key service kind 'aws_iam'" in result.stderr
    assert "did you mean 'aws-iam'?" in result.stderr


def test_a_plugin_kind_is_resolved_through_its_entry_point(tmp_path: Path, emulator: Emulator,
                                                         emulator_server: Any) -> None:
    """A package that registers `acme` (a dist-info with its entry point on the path, as pip would
    install it) is what `kind = "acme"` builds: `rotator scan` lists the keys through it."""
    now = emulator.now()
    client = emulator.add_client("acme-prod", "Acme", created_at=now - 400 * 86_400)
    site = plugin_site(tmp_path, PLUGIN)
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keyservice]\nkind = "acme"\n[keyservice.options]\nurl = "{emulator_server.url}"\n'
                      'token_env = "ACME_TOKEN"\n[[sinks]]\nkind = "memory"\n')
    run = run_cli(site, config, "scan", "--json", ACME_TOKEN=TOKEN)
    assert run.returncode == 0, run.stderr[-1500:]
    assert next(iter(client.keys)) in run.stdout and TOKEN not in run.stdout + run.stderr
    # The same file without the plugin installed: the kind is unknown, said in one line.
    missing = run_cli(tmp_path / "nothing-installed", config, "check-config", ACME_TOKEN=TOKEN)
    assert missing.returncode == 2 and "unknown key service kind 'acme'" in missing.stderr


def test_the_built_in_kinds_take_no_options(tmp_path: Path) -> None:
    config = tmp_path / "rotator.toml"
    config.write_text('[keyservice]\nkind = "emulator"\n[keyservice.options]\nurl = "x"\n[[sinks]]\nkind = "memory"\n')
    result = CliRunner().invoke(app, ["check-config", "--config", str(config)], env={"ROTATOR_FINGERPRINT_KEY": FP_KEY})
    assert result.exit_code == 2 and "keyservice.options: the built-in kind 'emulator' takes none" in result.stderr


def plugin_site(tmp_path: Path, source: str) -> Path:
    """A package `rotator_acme` registering `acme`, as pip would install it."""
    site = tmp_path / "site"
    (site / "rotator_acme").mkdir(parents=True)
    (site / "rotator_acme" / "__init__.py").write_text(source)
    info = site / "rotator_acme-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rotator-acme\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rotator.keyservices]\nacme = rotator_acme:build\n")
    return site


def run_cli(site: Path, config: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")},
               "PYTHONPATH": str(site), "ROTATOR_FINGERPRINT_KEY": FP_KEY, **env}
    return subprocess.run([sys.executable, "-m", "rotator.cli", *command, "--config", str(config)], env=environ,
                          capture_output=True, text=True, timeout=60)


def test_a_broken_plugin_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A plugin whose module does not import is said by check-config; one whose builder misses an
    option stops `scan` with one configuration line (exit 2)."""
    config = tmp_path / "rotator.toml"
    config.write_text('[keyservice]\nkind = "acme"\n[keyservice.options]\nregion = "eu"\n[[sinks]]\nkind = "memory"\n')
    broken = run_cli(plugin_site(tmp_path / "a", "import no_such_module_here\n"), config, "check-config")
    assert broken.returncode == 2 and "key service kind 'acme' cannot be imported" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr
    missing = run_cli(plugin_site(tmp_path / "b", PLUGIN), config, "scan")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-1500:]
    assert "keyservice.options: the 'acme' key service needs option 'url'" in missing.stderr


def test_a_plugin_option_never_holds_a_credential_inline(tmp_path: Path) -> None:
    """Like every built-in key: a credential-named option, a `*_env` that is a pasted token and a
    URL with a password are refused without quoting them; a `*_env` variable must be set."""
    site = plugin_site(tmp_path, PLUGIN)
    config = tmp_path / "rotator.toml"
    config.write_text('[keyservice]\nkind = "acme"\n[keyservice.options]\n'
                      'token = "sk_live_4f9a0c1d2e3b5a6c"\nurl = "https://admin:hunter2hunter2@acme.example/"\n'
                      'secret_env = "ghp_0123456789abcdefABCDEF"\n[[sinks]]\nkind = "memory"\n')
    refused = run_cli(site, config, "check-config")
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2, said
    for name in ("option token: credentials are never inline; use `token_env` or `token_file`",
                 "option url looks like a credential or a URL with one", "option secret_env must name an environment"):
        assert name in said, (name, said)
    assert not any(secret in said for secret in ("sk_live_4f9a", "hunter2hunter2", "ghp_0123"))
    config.write_text('[keyservice]\nkind = "acme"\n[keyservice.options]\nurl = "https://acme.example/"\n'
                      'token_env = "ACME_TOKEN"\n[[sinks]]\nkind = "memory"\n')
    unset = run_cli(site, config, "check-config")
    assert unset.returncode == 2 and "keyservice.options.token_env: plugin credential: environment variable" \
        in unset.stderr, unset.stderr
