"""The AWS sink's pre-flight against moto with IAM authentication on: each permission the write
needs, taken away in turn, is named by `check-config --ping` and by `prepare`, before any reset.

moto runs as a process of its own (its authentication switch is process-wide) and checks actions,
not resource ARNs, so each policy here grants `Resource: "*"` minus one action.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.domain import KeyRef
from rotator.embedded import free_port
from rotator.engine import Engine
from rotator.errors import ForbiddenError
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.emulator import Emulator
from rotator.keyservice.emulator_http import EmulatorServer
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.sinks import registry
from rotator.sinks.aws import PREFLIGHT_STAGE
from rotator.state import RedisState
from tests.aws_helpers import FaultProxy
from tests.conftest import FP_KEY, write_config
from tests.test_sinks import moto_url  # noqa: F401 - the session's moto server, a fixture

FP = Fingerprinter(FP_KEY)
DAY = 86_400
ACTIONS = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret", "secretsmanager:PutSecretValue",
           "secretsmanager:CreateSecret", "secretsmanager:TagResource", "secretsmanager:ListSecrets"]


class AuthMoto:
    """A moto server process with IAM users made while authentication is off, then switched on."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/moto-api/data.json", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.users: dict[str, dict[str, str]] = {}

    def user(self, name: str, actions: list[str]) -> None:
        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="rotator", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.users[name] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def enforce(self) -> None:
        assert httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0", timeout=5).status_code == 200

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def moto_auth() -> Iterator[AuthMoto]:
    server = AuthMoto()
    try:
        server.user("full", ACTIONS)
        for action in ACTIONS:
            server.user(f"no-{action.split(':')[1]}", [a for a in ACTIONS if a != action])
        server.enforce()
        yield server
    finally:
        server.stop()


def sink_as(moto_auth: AuthMoto, user: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in moto_auth.users[user].items():
        monkeypatch.setenv(name, value)
    return registry.build("aws", {"region": "eu-west-1", "endpoint_url": moto_auth.url,
                                  "name": "rotator/{client_id}/{key_id}", "tags": {"team": "payments"}}, FP)


@pytest.fixture
def due(emulator: Emulator) -> str:
    return next(iter(emulator.add_client(f"acme{uuid.uuid4().hex[:6]}", "Acme",
                                         created_at=emulator.now() - 400 * DAY).keys))


def rotate(keyservice: HttpKeyService, state: RedisState, sink: Any, client_id: str, key_id: str,
           force: bool = False) -> Any:
    engine = Engine(keyservice, [sink], state, CapturePublisher(), FP, Policy())
    return engine.rotate(KeyRef(client_id, key_id), trigger="test", force=force)


def test_with_every_permission_a_key_is_rotated_twice_and_readers_never_see_the_marker(
    moto_auth: AuthMoto, monkeypatch: pytest.MonkeyPatch, emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str,
) -> None:
    """The full policy: ping passes; the first rotation creates the secret (empty, in the
    pre-flight) and the second writes over it; AWSCURRENT is the key's secret each time,
    AWSPREVIOUS the one before, and the pre-flight's marker only ever carries its own label."""
    sink = sink_as(moto_auth, "full", monkeypatch)
    sink.ping()
    client_id = next(c.client_id for c in keyservice.list_clients() if c.client_id.startswith("acme"))
    first = rotate(keyservice, state, sink, client_id, due)
    assert first.status == "succeeded", first.reason
    key = keyservice.get_key(client_id, due)
    first_secret = emulator.current_secret(client_id, due)
    second = rotate(keyservice, state, sink, client_id, due, force=True)
    assert second.status == "succeeded", second.reason
    key = keyservice.get_key(client_id, due)
    assert sink.read_secret(key).reveal() == emulator.current_secret(client_id, due)
    assert sink.read_document(key, "AWSPREVIOUS")["api_key"] == first_secret
    stages = sink.metadata(key)["VersionIdsToStages"]
    marker = [v for v, labels in stages.items() if PREFLIGHT_STAGE in labels]
    assert len(marker) == 1 and stages[marker[0]] == [PREFLIGHT_STAGE], stages
    assert sorted(sorted(v) for v in stages.values()) == [["AWSCURRENT"], ["AWSPREVIOUS"], [PREFLIGHT_STAGE]]
    assert len(emulator.ledger) == 2
    sink.prepare(key)  # a later pre-flight re-puts the same marker: no new version
    assert sink.metadata(key)["VersionIdsToStages"] == stages


@pytest.mark.parametrize("action", ACTIONS, ids=[a.split(":")[1] for a in ACTIONS])
def test_a_missing_permission_is_named_before_any_reset(
    moto_auth: AuthMoto, monkeypatch: pytest.MonkeyPatch, emulator: Emulator, emulator_server: EmulatorServer,
    keyservice: HttpKeyService, state: RedisState, due: str, redis_server: str, tmp_path: Path,
    env: pytest.MonkeyPatch, action: str,
) -> None:
    """Each action of the policy taken away: `check-config --ping` fails naming it; a rotation
    fails in its pre-flight naming it (ListSecrets only serves ping and `reconcile`), and the key
    service was never asked to reset. The access keys appear nowhere."""
    user = f"no-{action.split(':')[1]}"
    sink = sink_as(moto_auth, user, monkeypatch)
    settings = {"kind": "aws", "region": "eu-west-1", "endpoint_url": moto_auth.url, "tags": {"team": "payments"}}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items() if k != "tags")
    config = write_config(tmp_path / "rotator.toml", emulator_server.url, redis_server,
                          sinks=lines + '\n[sinks.tags]\nteam = "payments"')
    result = CliRunner().invoke(app, ["check-config", "--ping", "--config", str(config)])
    assert result.exit_code == 1 and f"the credentials need {action}" in result.stderr, result.stderr

    client_id = next(c.client_id for c in keyservice.list_clients() if c.client_id.startswith("acme"))
    outcome = rotate(keyservice, state, sink, client_id, due)
    if action == "secretsmanager:ListSecrets":
        assert outcome.status == "succeeded", outcome.reason
        return
    assert outcome.status == "failed" and "the key was not reset" in outcome.reason, outcome.reason
    assert f"the credentials need {action}" in outcome.reason
    assert emulator.ledger == []
    shown = result.stderr + outcome.reason
    assert not [v for v in moto_auth.users[user].values() if v in shown]


def test_a_second_rotation_needs_put_where_the_first_needed_create(
    moto_auth: AuthMoto, monkeypatch: pytest.MonkeyPatch, emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str,
) -> None:
    """A secret that exists (written under the full policy): without PutSecretValue the next
    rotation's pre-flight refuses before the reset, and nothing was written to it."""
    client_id = next(c.client_id for c in keyservice.list_clients() if c.client_id.startswith("acme"))
    assert rotate(keyservice, state, sink_as(moto_auth, "full", monkeypatch), client_id, due).status == "succeeded"
    sink = sink_as(moto_auth, "no-PutSecretValue", monkeypatch)
    key = keyservice.get_key(client_id, due)
    before = sink.metadata(key)["VersionIdsToStages"]
    with pytest.raises(ForbiddenError, match="the credentials need secretsmanager:PutSecretValue"):
        sink.prepare(key)
    outcome = rotate(keyservice, state, sink, client_id, due, force=True)
    assert outcome.status == "failed" and len(emulator.ledger) == 1
    assert sink.metadata(key)["VersionIdsToStages"] == before
    assert os.environ["AWS_ACCESS_KEY_ID"] not in outcome.reason


def test_a_secret_made_without_a_value_elsewhere_is_checked_for_put_too(
    moto_auth: AuthMoto, monkeypatch: pytest.MonkeyPatch, emulator: Emulator, keyservice: HttpKeyService,
    state: RedisState, due: str,
) -> None:
    """Infrastructure code created the secret with no value (a Terraform `aws_secretsmanager_secret`
    without a version): any first version would become its AWSCURRENT, so the pre-flight puts its
    marker to the probe secret instead. Without PutSecretValue it refuses before the reset; with
    it, the key's secret still has no version until the rotation writes the key's secret."""
    client_id = next(c.client_id for c in keyservice.list_clients() if c.client_id.startswith("acme"))
    name = f"rotator/{client_id}/{due}"
    full = sink_as(moto_auth, "full", monkeypatch)
    full._client.create_secret(Name=name)
    key = keyservice.get_key(client_id, due)
    denied = rotate(keyservice, state, sink_as(moto_auth, "no-PutSecretValue", monkeypatch), client_id, due)
    assert denied.status == "failed" and "the credentials need secretsmanager:PutSecretValue" in denied.reason
    assert "rotator/rotator-preflight" in denied.reason, denied.reason
    assert emulator.ledger == []
    full = sink_as(moto_auth, "full", monkeypatch)
    full.prepare(key)
    assert full.metadata(key).get("VersionIdsToStages", {}) == {}  # nothing put to the key's own secret
    assert rotate(keyservice, state, full, client_id, due).status == "succeeded"
    assert full.read_secret(keyservice.get_key(client_id, due)).reveal() == emulator.current_secret(client_id, due)
    assert [sorted(v) for v in full.metadata(key)["VersionIdsToStages"].values()] == [["AWSCURRENT"]]


def test_the_marker_reads_as_nothing_and_its_token_follows_its_text() -> None:
    """A stored marker is never taken for a key's document, and a marker of other text gets
    another ClientRequestToken (AWS refuses a token reused with other content)."""
    from rotator.sinks import aws

    assert aws._is_marker(aws.MARKER) and aws._is_marker('{"rotator_preflight": "older text"}')
    assert not aws._is_marker('{"rotator_preflight": 1, "api_key": "x"}') and not aws._is_marker("not json")
    token = aws._marker_token("rotator/a/b")
    assert 32 <= len(token) <= 64 and token == aws._marker_token("rotator/a/b") != aws._marker_token("rotator/a/c")
    original = aws.MARKER
    try:
        aws.MARKER = '{"rotator_preflight": "another text"}'
        assert aws._marker_token("rotator/a/b") != token
    finally:
        aws.MARKER = original


@pytest.fixture
def kms_proxy(moto_url: str) -> Iterator[FaultProxy]:  # noqa: F811
    with FaultProxy(moto_url) as proxy:
        yield proxy


def test_a_kms_key_that_refuses_is_found_before_the_reset(
    kms_proxy: FaultProxy, emulator: Emulator, keyservice: HttpKeyService, state: RedisState, due: str,
) -> None:
    """moto's Secrets Manager does not call KMS, so KMS's refusal comes from a proxy in front of it,
    as AWS answers it: the pre-flight's marker put is refused (GenerateDataKey) and the rotation
    fails before the reset, saying so."""
    client_id = next(c.client_id for c in keyservice.list_clients() if c.client_id.startswith("acme"))
    sink = registry.build("aws", {"region": "eu-west-1", "endpoint_url": kms_proxy.url}, FP)
    kms_proxy.fail("PutSecretValue", "KMSAccessDeniedException", times=5)
    outcome = rotate(keyservice, state, sink, client_id, due)
    assert outcome.status == "failed" and "the key was not reset" in outcome.reason, outcome.reason
    assert "KMS refused (KMSAccessDeniedException)" in outcome.reason and "kms:GenerateDataKey" in outcome.reason
    assert emulator.ledger == []
