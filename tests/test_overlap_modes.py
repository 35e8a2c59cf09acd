"""The overlap strategy against the key-service contract as the payment API publishes it (unique
aliases, no `Replaces`): the emulator's switch for the successor extension, and a key service
without successors refusing overlap before anything is created (issue 27's first slice)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.config import settings_from_mapping
from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.events import CapturePublisher
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.plan import plan_one
from rotator.policy import Policy
from rotator.runtime import build_keyservice
from rotator.sinks import registry
from rotator.state import RedisState
from tests.conftest import FP_KEY, TOKEN, write_config
from tests.test_engine import FP

DAY = 86_400


@pytest.fixture
def published() -> Iterator[tuple[Emulator, EmulatorServer]]:
    """The emulator serving the contract as published: no successor extension."""
    emulator = Emulator(token=TOKEN, successors=False)
    with EmulatorServer(emulator) as server:
        yield emulator, server


def api(server: EmulatorServer, method: str, path: str, body: Any = None) -> httpx.Response:
    import uuid

    return httpx.request(method, f"{server.url}/v2.01/{path}", json=body, timeout=5,
                         headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": str(uuid.uuid4())})


def test_the_emulator_serves_the_contract_as_published_when_told(
    published: tuple[Emulator, EmulatorServer], emulator_server: EmulatorServer, emulator: Emulator
) -> None:
    """Off: a key's answer has no `Replaces`/`ReplacedBy`, a create's `Replaces` is ignored, and an
    alias stays unique (409). On (the default, until the alias-template mode lands): as before."""
    strict, server = published
    now = strict.now()
    strict.add_client("acme", created_at=now - 400 * DAY)
    old = strict.add_key("acme", "payouts", created_at=now - 100 * DAY)
    got = api(server, "GET", f"acme/apikeys/{old.id}").json()
    assert got["Alias"] == "payouts" and "Replaces" not in got and "ReplacedBy" not in got
    scopes = old.scopes
    taken = api(server, "POST", "acme/apikeys", {"Alias": "payouts", "Scopes": scopes, "Replaces": old.id})
    assert taken.status_code == 409, taken.text
    fresh = api(server, "POST", "acme/apikeys", {"Alias": "payouts--r1", "Scopes": scopes, "Replaces": old.id})
    assert fresh.status_code == 200 and "Replaces" not in fresh.json() and "ReplacedBy" not in fresh.json()
    assert strict.get_key("acme", old.id).get("ReplacedBy") is None and "Replaces" not in strict.get_key(
        "acme", fresh.json()["Id"])

    emulator.add_client("acme", created_at=now - 400 * DAY)
    linked = emulator.add_key("acme", "payouts", created_at=now - 100 * DAY)
    successor = api(emulator_server, "POST", "acme/apikeys",
                    {"Alias": "payouts", "Scopes": scopes, "Replaces": linked.id})
    assert successor.status_code == 200 and successor.json()["Replaces"] == linked.id


def test_overlap_against_the_published_contract_creates_nothing_and_says_why(
    published: tuple[Emulator, EmulatorServer], state: RedisState, env: pytest.MonkeyPatch
) -> None:
    """With `keyservice.successors = false` the plan refuses the overlap strategy and the engine
    sends nothing for a revocable key (no create, no reset); the Auto-generated key, which can
    only be reset, is reset."""
    strict, server = published
    now = strict.now()
    auto = next(iter(strict.add_client("acme", created_at=now - 400 * DAY).keys))
    user = strict.add_key("acme", "payouts", created_at=now - 100 * DAY).id
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    env.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    settings = settings_from_mapping({"keyservice": {"url": server.url, "successors": False},
                                      "policy": {"strategy": "overlap"},
                                      "sinks": [{"kind": "memory", "path": "{client_id}/{alias}"}]})
    service = build_keyservice(settings.keyservice)
    assert isinstance(service, HttpKeyService)
    engine = Engine(service, [registry.build("memory", {}, FP)], state, CapturePublisher(), FP,
                    Policy(strategy="overlap"))
    step = plan_one(engine, "acme", user, False, False)
    assert step.action == "refuse" and "keyservice.successors = false" in step.why
    result = engine.rotate(KeyRef("acme", user), trigger="schedule")
    assert result.status == "failed" and "nothing was created" in result.reason
    assert strict.ledger == [] and strict.keys_page("acme", 1, 100)[1] == 2  # nothing reset, nothing created
    assert engine.rotate(KeyRef("acme", auto), trigger="schedule").status == "succeeded"
    assert [e.key_id for e in strict.ledger] == [auto]
    service.close()


def test_check_config_ping_says_which_overlap_mode_applies(
    tmp_path: Path, published: tuple[Emulator, EmulatorServer], emulator_server: EmulatorServer, redis_server: str
) -> None:
    env = {**__import__("os").environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY}
    for server, successors, said in ((emulator_server, True, "overlap strategy: successors (Replaces)"),
                                     (published[1], False, "overlap strategy: not available (keyservice.successors "
                                                           "= false); keys are reset")):
        config = write_config(tmp_path / f"{successors}.toml", server.url, redis_server)
        config.write_text(config.read_text().replace("[state]", f"successors = {json.dumps(successors)}\n[state]"))
        done = subprocess.run([sys.executable, "-m", "rotator.cli", "check-config", "--ping", "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=60)
        assert said in done.stderr, done.stderr
