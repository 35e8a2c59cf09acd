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

from rotator.config import ConfigError, settings_from_mapping
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
    alias stays unique (409): the default, as the docs recommend against the payment API. On
    (`--successors`): the successor extension."""
    assert Emulator().successors is False
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


def test_overlap_against_the_published_contract_plans_the_alias_template_at_the_base_alias_place(
    published: tuple[Emulator, EmulatorServer], state: RedisState, env: pytest.MonkeyPatch
) -> None:
    """With `keyservice.successors = false` a sink path must not name the alias (the new key's
    differs): check-config refuses `{alias}`, and so does the engine before anything is sent. With
    `{base_alias}` the plan says the alias-template mode; the Auto-generated key is reset."""
    strict, server = published
    now = strict.now()
    auto = next(iter(strict.add_client("acme", created_at=now - 400 * DAY).keys))
    user = strict.add_key("acme", "payouts", created_at=now - 100 * DAY).id
    env.setenv("ROTATOR_KEYSERVICE_TOKEN", TOKEN)
    env.setenv("ROTATOR_FINGERPRINT_KEY", FP_KEY)
    config = {"keyservice": {"url": server.url, "successors": False}, "policy": {"strategy": "overlap"},
              "sinks": [{"kind": "memory", "path": "{client_id}/{alias}"}]}
    with pytest.raises(ConfigError) as refused_config:
        settings_from_mapping(config)
    assert "sinks[0].path" in str(refused_config.value) and "{base_alias}" in str(refused_config.value)
    config["sinks"] = [{"kind": "memory", "path": "{client_id}/{base_alias}"}]
    service = build_keyservice(settings_from_mapping(config).keyservice)
    assert isinstance(service, HttpKeyService)
    engine = Engine(service, [registry.build("memory", {"path": "{client_id}/{alias}"}, FP)], state,
                    CapturePublisher(), FP, Policy(strategy="overlap"))
    refused = engine.rotate(KeyRef("acme", user), trigger="schedule")
    assert refused.status == "failed" and "use {base_alias}" in refused.reason, refused.reason
    assert "nothing was created" in refused.reason
    assert strict.ledger == [] and strict.keys_page("acme", 1, 100)[1] == 2  # nothing reset, nothing created

    engine = Engine(service, [registry.build("memory", {"path": "{client_id}/{base_alias}"}, FP)], state,
                    CapturePublisher(), FP, Policy(strategy="overlap"))
    step = plan_one(engine, "acme", user, False, False)
    assert step.action == "rotate" and "alias template '{alias}--r{n}'" in step.why and "'payouts'" in step.why
    assert engine.rotate(KeyRef("acme", auto), trigger="schedule").status == "succeeded"
    assert [e.key_id for e in strict.ledger] == [auto]
    service.close()


def test_check_config_ping_says_which_overlap_mode_applies(
    tmp_path: Path, published: tuple[Emulator, EmulatorServer], emulator_server: EmulatorServer, redis_server: str
) -> None:
    env = {**__import__("os").environ, "ROTATOR_KEYSERVICE_TOKEN": TOKEN, "ROTATOR_FINGERPRINT_KEY": FP_KEY}
    for server, successors, said in ((emulator_server, True, "overlap strategy: successors (Replaces)"),
                                     (published[1], False, "overlap strategy: alias template '{alias}--r{n}' "
                                                           "(keyservice.successors = false)")):
        config = write_config(tmp_path / f"{successors}.toml", server.url, redis_server)
        config.write_text(config.read_text().replace("[state]", f"successors = {json.dumps(successors)}\n[state]"))
        done = subprocess.run([sys.executable, "-m", "rotator.cli", "check-config", "--ping", "--config", str(config)],
                              env=env, capture_output=True, text=True, timeout=60)
        assert said in done.stderr, done.stderr
