"""`rotator demo`: the real worker and beat on embedded defaults, with nothing installed or running.

A private Redis, the key-service emulator seeded with `seed.json`, the encrypted file sink,
`enforce` mode and a 10-second scan. Credentials are generated into `.rotator-demo/` (mode 0600)
and the config there names them by file, so `rotator status --config .rotator-demo/rotator.toml`
works from another terminal. With `--vault`, a private OpenBao (a real Vault API) is a second
sink, set up as docs/operations.md says (AppRole, the least-privilege policy), and the secrets
read back with `bao kv get`. Ctrl-C stops every process it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.fernet import Fernet
from rich.console import Console
from rich.live import Live
from rich.table import Table

from rotator.config import load_settings
from rotator.console import show
from rotator.embedded import PrivateRedis, group_running
from rotator.keys import init_keys
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.openbao import PrivateOpenBao, bao_binary, operator_setup
from rotator.policy import classify
from rotator.runtime import build_state
from rotator.scan import scan

SEED = Path(__file__).with_name("seed.json")
VAULT_MOUNT = "secret"  # the dev server's own KV v2 mount
VAULT_PATH = "rotator/{client_id}/{key_id}"


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value)
    path.chmod(0o600)
    return path


def vault_sink(home: Path, bao: PrivateOpenBao) -> str:
    """An AppRole login on the private OpenBao under the least-privilege policy, as a `[[sinks]]`
    table; its ids and the server's root token (for `bao kv get`) are in files of mode 0600."""
    role_id, secret_id, _ = operator_setup(bao, home, VAULT_MOUNT, VAULT_PATH)
    return f"""
[[sinks]]
kind = "vault"
url = "{bao.url}"
mount = "{VAULT_MOUNT}"
path = "{VAULT_PATH}"
auth = "approle"
role_id_file = "{role_id}"
secret_id_file = "{secret_id}"
"""


def rotator_command() -> str:
    """How any shell runs this install of rotator: `rotator` when that is it on PATH, else the
    absolute path of its script (`…/.venv/bin/rotator` after `python3 dev.py demo`), which works
    from any directory in a new terminal."""
    script = Path(sys.executable).parent / "rotator"
    found = shutil.which("rotator")
    if found is not None and script.exists() and Path(found).resolve() == script.resolve():
        return "rotator"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m rotator.cli"
    return shlex.quote(str(script.absolute()))


def write_config(home: Path, redis_url: str, emulator_url: str, extra_sinks: str = "") -> Path:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = _secret_file(home / "keyservice.token", secrets.token_urlsafe(24))
    fp_key = _secret_file(home / "fingerprint.key", secrets.token_urlsafe(32))
    file_key = home / "file.key"
    if not file_key.exists():  # keep the key across runs so earlier files stay readable
        _secret_file(file_key, Fernet.generate_key().decode())
    keys = init_keys(home / "keys", ["demo"])  # the worker and beat sign every task message with it
    config = home / "rotator.toml"
    config.write_text(f"""# Written by `rotator demo`; see examples/ for production files.
[keyservice]
kind = "http"
url = "{emulator_url}"
token_file = "{token}"

[policy]
max_age_days = 90
warn_before_days = 14
mode = "enforce"

[state]
redis_url = "{redis_url}/0"

[celery]
broker_url = "{redis_url}/1"
scan_every_s = 10
concurrency = 2

[engine]
fingerprint_key_file = "{fp_key}"
idempotency_key_file = "{keys.idempotency_key}"
sink_retry_s = 30

[signing]
mode = "enforce"
name = "demo"
private_key_file = "{keys.signing_key('demo')}"

[[sinks]]
kind = "file"
dir = "{home / 'secrets'}"
key_file = "{file_key}"
{extra_sinks}""")
    return config


def _table(config: Path, started: float) -> Table:
    settings = load_settings(config)
    from rotator.runtime import build_keyservice

    service = build_keyservice(settings.keyservice)
    state = build_state(settings)
    table = Table(title=f"rotator demo · {int(time.time() - started)}s · Ctrl-C stops everything")
    for col in ("client_id", "key_id", "alias", "env", "age (days)", "state", "last rotation"):
        table.add_column(col)
    colours = {"due": "red", "due_soon": "yellow", "ok": "green"}
    try:
        for row in scan(service, settings.policy.to_policy(), time.time()):
            last = state.last_rotation(row.key.ref)
            text = f"{last['status']} ({last['trigger']})" if last else ""
            st = classify(row.key, time.time(), settings.policy.to_policy()).value
            c = colours.get(st, "dim")
            table.add_row(show(row.key.client_id), show(row.key.key_id), show(row.key.alias),
                          row.key.environment.value[:4], f"{row.age_days:.1f}", f"[{c}]{st}[/{c}]", show(text))
    finally:
        service.close()
    return table


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20) -> bool:
    """SIGTERM the whole process group (`rotator run`, its worker's pool, beat) and wait for all of it,
    not only its leader: the leader can exit while its pool's processes are still finishing, and
    "stopped" would then be said too early. SIGKILL whatever is left after the grace. Whether
    nothing of the group runs any more."""
    if proc.poll() is not None and not group_running(proc.pid):
        return True  # all gone: the group's number may be another's by now
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    while group_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None or group_running(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        deadline = time.monotonic() + 5
        while group_running(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    return proc.poll() is not None and not group_running(proc.pid)


@contextlib.contextmanager
def services(home: Path, port: int, vault: bool = False) -> Iterator[tuple[Path, PrivateRedis, EmulatorServer,
                                                                           PrivateOpenBao | None]]:
    emulator = Emulator(token="unused")
    emulator.rate_limits = None  # its live table reads every second, for hours: near the published daily limit
    emulator.load_seed_file(SEED)
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(PrivateRedis())
        server = stack.enter_context(EmulatorServer(emulator, port=port))
        bao = stack.enter_context(PrivateOpenBao()) if vault else None
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = write_config(home, redis_server.url, server.url, vault_sink(home, bao) if bao else "")
        emulator.token = (home / "keyservice.token").read_text()
        yield config, redis_server, server, bao


#: Set by Ctrl-C, a closed terminal (SIGHUP) or SIGTERM. A flag, not KeyboardInterrupt: an exception
#: raised while a finalizer runs (a Redis client being collected) is dropped, and the demo would go on.
STOP = threading.Event()


def _stop_requested(*_: object) -> None:
    STOP.set()


def main(home: Path, port: int, duration: float | None, plain: bool, vault: bool = False) -> int:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, _stop_requested)
    console = Console()
    started = time.time()
    with services(home, port, vault) as (config, _redis, server, bao):
        log = (home / "worker.log").open("wb")
        env = {**os.environ, "ROTATOR_CONFIG": str(config), "ROTATOR_LOG_FORMAT": "json"}
        worker = subprocess.Popen([sys.executable, "-m", "rotator.cli", "run", "--config", str(config)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        console.print(f"key-service emulator: {server.url} · worker log: {home / 'worker.log'}")
        console.print(f"in another terminal: {rotator_command()} status --config {shlex.quote(str(config))}",
                      soft_wrap=True, markup=False, highlight=False)
        if bao is not None:
            console.print(f"OpenBao (a real Vault API): {bao.url} · read a stored secret with\n"
                          f"  BAO_ADDR={bao.url} BAO_TOKEN=$(cat {home / 'openbao-root.token'}) "
                          f"{bao_binary()} kv get -mount={VAULT_MOUNT} rotator/<client_id>/<key_id>",
                          highlight=False, soft_wrap=True)
        try:
            deadline = None if duration is None else started + duration
            seen: set[str] = set()
            if plain:
                state = build_state(load_settings(config))
                while not STOP.is_set() and (deadline is None or time.time() < deadline):
                    for entry in reversed(state.history(50)):
                        mark = f"{entry.get('attempt_id')}:{entry.get('status')}"
                        if mark not in seen:
                            seen.add(mark)
                            console.print(f"{entry['status']:>9} {entry['client_id']}/{entry['key_id']} "
                                          f"trigger={entry['trigger']} sinks={entry['sinks']}", highlight=False)
                    if worker.poll() is not None:
                        break
                    STOP.wait(1)
            else:
                with Live(_table(config, started), console=console, refresh_per_second=1) as live:
                    while not STOP.is_set() and (deadline is None or time.time() < deadline):
                        STOP.wait(1)
                        live.update(_table(config, started))
                        if worker.poll() is not None:
                            break
        finally:
            interrupted = STOP.is_set()
            if interrupted:
                console.print("Ctrl-C: stopping the worker and beat (a rotation in flight finishes first), "
                              "then Redis and the emulator…")
            stopped = _stop(worker)
            log.close()
        if not stopped:
            console.print(f"[red]a process of the worker's group {worker.pid} did not stop even after SIGKILL; "
                          f"see `ps -g {worker.pid}`[/red]")
            return 1
        if worker.returncode not in (0, -signal.SIGTERM, None) and not interrupted and duration is None:
            console.print(f"[red]the worker exited with {worker.returncode}; see {home / 'worker.log'}[/red]")
            return 1
        console.print("stopped: worker, beat, Redis" + (", OpenBao" if bao else "") + " and the emulator; the "
                      "demo's files stay in "
                      f"{home} (delete it to start afresh)")
    return 0
