"""Fixtures shared by the suite: a real emulator over HTTP, a client for it, a private Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.sinks.memory import MemorySink

# Run first: with the suite spread over processes (dev.py test), the simulation (a fifth of the
# serial run, all CPU) starts at once instead of trailing behind the rest. Only it: the files that
# start real workers keep their places, so they do not all start together and starve each other.
FIRST = "test_simulation.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`FIRST` first; the rest as collected (a stable sort, the same in every process, as
    pytest-xdist needs)."""
    items.sort(key=lambda item: item.path.name != FIRST)


TOKEN = "test-management-token"
FP_KEY = "test-fingerprint-key-0123456789"


def write_config(path: Path, keyservice_url: str, redis_url: str, *, clients: list[str] | None = None,
                 sinks: str = 'kind = "memory"') -> Path:
    """A config for the CLI against the test emulator and a private Redis (state in db 0, the
    broker in db 1); `sinks` is the body of one `[[sinks]]` table."""
    listed = f"clients = {clients!r}\n".replace("'", '"') if clients is not None else ""
    path.write_text(f'[keyservice]\nurl = "{keyservice_url}"\n{listed}[state]\nredis_url = "{redis_url}/0"\n'
                    f'[celery]\nbroker_url = "{redis_url}/1"\n[[sinks]]\n{sinks}\n')
    return path


def redis_text(client: Any, match: str = "*") -> str:
    """Every key matching `match` with its value read by type, as text: what a leak test searches.
    (DUMP's serialisation may LZF-compress a value, which hides a string inside it.)"""
    parts: list[str] = []
    for key in client.scan_iter(match):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value: object = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
                         "list": lambda k: client.lrange(k, 0, -1), "zset": lambda k: client.zrange(k, 0, -1),
                         "stream": lambda k: client.xrange(k)}.get(kind, lambda k: f"<{kind}>")(key)
        parts.append(f"{key!r} {value!r}")
    return "\n".join(parts)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(token=TOKEN, successors=True)  # the successor extension: tests/test_alias_lineage.py runs without
    yield emu


@pytest.fixture
def emulator_server(emulator: Emulator) -> Iterator[EmulatorServer]:
    with EmulatorServer(emulator) as server:
        yield server


@pytest.fixture
def keyservice(emulator_server: EmulatorServer) -> Iterator[HttpKeyService]:
    # Tests move the emulator's clock up to a little over a day ahead of this host's.
    with HttpKeyService(emulator_server.url, TOKEN, timeout_s=2, max_attempts=4,
                        retry_initial_s=0.01, retry_max_wait_s=0.2, clock_skew_s=3 * 86_400) as service:
        yield service


@pytest.fixture(autouse=True)
def _fresh_memory_sinks() -> Iterator[None]:
    MemorySink.reset_all()
    yield
    MemorySink.reset_all()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Credentials every config in the tests names."""
    monkeypatch.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    for name in list(os.environ):
        if name.startswith("ROTATOR_") and "__" in name:
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port for the whole run."""
    from rotator.embedded import PrivateRedis

    with PrivateRedis() as server:
        yield server.url


@pytest.fixture
def state(redis_server: str) -> Iterator[object]:
    import uuid

    from rotator.state import RedisState

    store = RedisState.from_url(redis_server + "/0", namespace=f"t-{uuid.uuid4().hex[:8]}")
    yield store
    for key in store.client.scan_iter(f"{store.ns}:*"):
        store.client.delete(key)


# --- a real Vault API: OpenBao, set up as docs/operations.md tells an operator -------------

DOCS = Path(__file__).resolve().parents[1] / "docs"


def doc_policy(mount: str, prefix: str) -> str:
    """The Vault policy exactly as docs/operations.md gives it, filled in for `mount` and `prefix`."""
    text = (DOCS / "operations.md").read_text()
    block = text.split("<!-- vault-policy:", 1)[1].split("```hcl\n", 1)[1].split("```", 1)[0]
    return block.replace("{mount}", mount).replace("{prefix}", prefix)


@pytest.fixture(scope="session")
def openbao() -> Iterator[object]:
    """A private OpenBao dev server on a free port for the whole run."""
    from rotator.openbao import PrivateOpenBao

    with PrivateOpenBao() as server:
        yield server


@pytest.fixture
def bao_sink(openbao: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """Settings of a Vault sink on the private OpenBao as an operator sets it up: a KV v2 mount of
    this test's own at a non-default path, AppRole login, the doc's least-privilege policy. The
    role and secret ids are in ROLE_ID / SECRET_ID."""
    import uuid

    from rotator.openbao import PrivateOpenBao, approle_login

    assert isinstance(openbao, PrivateOpenBao)
    mount = f"payments-kv-{uuid.uuid4().hex[:8]}"
    login = approle_login(openbao.client(), mount=mount, policy=doc_policy(mount, "rotator"),
                          role=f"rotator-{mount}")
    monkeypatch.setenv("ROLE_ID", login.role_id)
    monkeypatch.setenv("SECRET_ID", login.secret_id)
    yield {"url": openbao.url, "mount": mount, "path": "rotator/{client_id}/{key_id}", "auth": "approle",
           "role_id_env": "ROLE_ID", "secret_id_env": "SECRET_ID", "timeout_s": 2.0}
    openbao.client().sys.disable_secrets_engine(mount)
