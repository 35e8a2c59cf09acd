"""A newcomer's first configuration, from the README alone: its steps, run as written, against a real
key service (the emulator over HTTP), a private Redis and a private OpenBao, end at a passing
`check-config --ping` in one round.

The steps and the file are read out of README.md (and the AppRole steps out of docs/operations.md,
which the README sends the reader to), so the documentation and this test cannot drift. What the
README leaves to the reader is all the test fills in: its own directory for `/etc/rotator`, the
addresses of its services for the example ones, and the values `$KEYSERVICE_TOKEN` and `$ALERT_URL`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.openbao import PrivateOpenBao, bao_binary
from tests.conftest import doc_policy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment `python3 dev.py …` made: `.venv/bin`
TOKEN = "newcomer-management-token-7f3a9c"
ALERT_URL = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrI/#payments-alerts"


def marked_block(text: str, marker: str) -> str:
    """The fenced block right after `<!-- marker…-->` in a document."""
    found = re.search(rf"<!-- {re.escape(marker)}[^>]*-->\n```[a-z]*\n(.*?)```", text, re.S)
    assert found, f"no block marked {marker!r}"
    return found.group(1)


@pytest.fixture
def vault() -> Iterator[PrivateOpenBao]:
    """A Vault of this test's own: the AppRole steps enable auth methods, once per Vault."""
    with PrivateOpenBao() as server:
        yield server


def test_the_readme_first_configuration_passes_check_config_ping_in_one_round(
        tmp_path: Path, redis_server: str, vault: PrivateOpenBao) -> None:
    readme = (ROOT / "README.md").read_text()
    files_steps = marked_block(readme, "first-configuration:files")
    config = marked_block(readme, "first-configuration:toml")
    check_step = marked_block(readme, "first-configuration:check")
    operations = (ROOT / "docs" / "operations.md").read_text()
    approle_steps = marked_block(operations, "vault-approle")
    approle_intro = operations.split("<!-- vault-approle")[0].rstrip().rsplit("\n\n", 1)[-1]

    home = tmp_path / "etc-rotator"
    with EmulatorServer(Emulator(token=TOKEN)) as keyservice:
        yours = {"/etc/rotator": str(home), "https://keys.example.com": keyservice.url.rstrip("/"),
                 "https://vault.internal:8200": vault.url, "redis://127.0.0.1:6379": redis_server}
        for example in yours:
            assert example in files_steps + config + check_step, f"the README no longer shows {example}"

        def filled(text: str) -> str:
            for example, mine in yours.items():
                text = text.replace(example, mine)
            return text

        path = f"{BIN}:{Path(bao_binary()).parent}:/usr/bin:/bin"
        base = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}

        def step(script: str, **env: str) -> subprocess.CompletedProcess[str]:
            # umask 022, a usual login's: the files come out 0600 because the README says `umask 077`.
            return subprocess.run(["bash", "-euo", "pipefail", "-c", filled(script)], cwd=tmp_path,
                                  env={**base, **env}, capture_output=True, text=True, timeout=120, umask=0o022)

        # 1. The files the README has the reader make.
        made = step(files_steps, KEYSERVICE_TOKEN=TOKEN, ALERT_URL=ALERT_URL)
        assert made.returncode == 0, made.stderr
        # The [engine] lines of the README's file are the ones `keys init` printed for that directory.
        printed = tomllib.loads(made.stdout)
        assert printed["engine"] == tomllib.loads(filled(config))["engine"]

        # 2. Vault as docs/operations.md sets it up, as the administrator it names (BAO_ADDR, BAO_TOKEN);
        # OpenBao's dev server has the KV v2 mount already, and that step says to skip it then. The
        # policy file is the doc's policy, filled in.
        skip, *rest = approle_steps.splitlines()
        assert skip.startswith("bao secrets enable") and "skip if the KV v2 mount exists" in skip
        assert "`BAO_ADDR`" in approle_intro and "`BAO_TOKEN`" in approle_intro
        (tmp_path / "rotator.hcl").write_text(doc_policy("secret", "rotator"))
        approle = step("\n".join(rest), BAO_ADDR=vault.url, BAO_TOKEN=vault.root_token)
        assert approle.returncode == 0, approle.stderr

        # 3. The configuration file, then the check, with nothing in the environment but PATH.
        (home / "rotator.toml").write_text(filled(config))
        checked = step(check_step)

    lines = checked.stderr.splitlines()
    assert checked.returncode == 0, checked.stderr
    assert [line.split()[0] for line in lines[:-1]] == ["ok"] * (len(lines) - 1), checked.stderr
    for service in ("keyservice http", "state redis", "celery broker", "vault"):
        assert any(line.startswith(f"ok   {service}") for line in lines), (service, checked.stderr)
    assert lines[-1] == f"{home / 'rotator.toml'} is valid"

    # No credential reached any output: the tokens, the made keys, the AppRole's secret id.
    secrets = [TOKEN, "TIiajkdnlazkcOXrI", vault.root_token]
    secrets += [(home / name).read_text().strip() for name in ("vault-secret-id", "vault-role-id")]
    secrets += [(home / "keys" / name).read_text().strip() for name in ("fingerprint.key", "idempotency.key")]
    everything = "".join(p.stdout + p.stderr for p in (made, approle, checked))
    for secret in secrets:
        assert secret not in everything
    # Every file the steps made is the rotator user's alone.
    for made_file in home.rglob("*"):
        if made_file.is_file() and made_file.name != "rotator.toml":
            assert made_file.stat().st_mode & 0o077 == 0, made_file
