"""AWS IAM access keys as keys (`kind = "aws-iam"`), against moto's server: listed with their
users' tags, filtered, exempted, aged, reported; never reset (the overlap strategy is not in this
version), with nothing sent to IAM."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.config import settings_from_mapping
from rotator.domain import KeyRef, KeyState
from rotator.errors import ConfigError
from rotator.keyservice import build_keyservice
from rotator.policy import Policy
from rotator.scan import scan
from tests.test_sinks import moto_url  # noqa: F401  (a session fixture: a moto server)

DAY = 86_400
runner = CliRunner()


@pytest.fixture
def iam(moto_url: str) -> dict[str, Any]:  # noqa: F811
    """A private user path on the shared moto server, with users for every rule."""
    client = boto3.client("iam", region_name="us-east-1", endpoint_url=moto_url)
    path = f"/rt{uuid.uuid4().hex[:8]}/"
    made: dict[str, Any] = {"url": moto_url, "path": path, "client": client, "keys": {}}

    def user(name: str, tags: dict[str, str] | None = None, keys: int = 1) -> None:
        full = f"{name}-{path.strip('/')}"
        client.create_user(UserName=full, Path=path, Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
        made["keys"][name] = [client.create_access_key(UserName=full)["AccessKey"]["AccessKeyId"] for _ in range(keys)]
        made[name] = full

    user("payments", {"rotator:managed": "true"}, keys=2)
    user("reports", {"rotator:environment": "sandbox"})
    user("legacy", {"rotator:exempt": "vendor integration, rotated by hand (JIRA-42)"})
    user("loose")
    client.create_group(GroupName=f"g-{path.strip('/')}")
    client.add_user_to_group(GroupName=f"g-{path.strip('/')}", UserName=made["payments"])
    client.update_access_key(UserName=made["payments"], AccessKeyId=made["keys"]["payments"][1], Status="Inactive")
    return made


def service(iam: dict[str, Any], **options: Any) -> Any:
    config = settings_from_mapping({"keyservice": {"kind": "aws-iam", "endpoint_url": iam["url"],
                                                   "user_path_prefix": iam["path"], **options},
                                    "sinks": [{"kind": "memory"}]}, environ={"ROTATOR_FINGERPRINT_KEY": "x"})
    return build_keyservice(config.keyservice)


def test_access_keys_are_listed_with_their_users_tags(iam: dict[str, Any]) -> None:
    """Alias = user name, environment from the tag, Inactive keys out of scope, the exemption tag
    excludes with its reason; 100 days on (moto creates keys now, so the scan looks from later),
    the active production key is due."""
    ks = service(iam)
    [account] = [c.client_id for c in ks.list_clients()]
    rows = {r.key.key_id: r for r in scan(ks, Policy(), time.time() + 100 * DAY)}
    active, inactive = iam["keys"]["payments"]
    assert rows[active].key.alias == iam["payments"] and rows[active].state is KeyState.DUE
    assert rows[active].key.client_id == account and rows[active].key.status == "ACTIVE"
    assert rows[inactive].state is KeyState.OUT_OF_SCOPE
    assert rows[iam["keys"]["reports"][0]].state is KeyState.OUT_OF_SCOPE  # SANDBOX
    legacy = rows[iam["keys"]["legacy"][0]]
    assert legacy.state is KeyState.EXCLUDED and "JIRA-42" in str(legacy.key.exempt)
    assert rows[iam["keys"]["loose"][0]].state is KeyState.DUE
    assert ks.get_key(account, active).alias == iam["payments"]


@pytest.mark.parametrize(("options", "users"), [
    ({"user_tag": "rotator:managed=true"}, {"payments"}),
    ({"user_tag": "rotator:managed"}, {"payments"}),
    ({"user_tag": "rotator:managed=false"}, set()),
])
def test_a_tag_filter_picks_users(iam: dict[str, Any], options: dict[str, str], users: set[str]) -> None:
    ks = service(iam, **options)
    [account] = [c.client_id for c in ks.list_clients()]
    assert {k.alias for k in ks.list_keys(account)} == {iam[u] for u in users}


def test_a_group_filter_picks_its_members(iam: dict[str, Any]) -> None:
    ks = service(iam, group=f"g-{iam['path'].strip('/')}")
    [account] = [c.client_id for c in ks.list_clients()]
    assert {k.alias for k in ks.list_keys(account)} == {iam["payments"]}


def test_a_reset_is_refused_before_anything_is_sent(iam: dict[str, Any], state: Any) -> None:
    """The plan refuses, and the engine fails the rotation without a record, an IAM call or a change."""
    from rotator.engine import Engine
    from rotator.events import CapturePublisher
    from rotator.fingerprint import Fingerprinter
    from rotator.plan import plan_one
    from rotator.sinks import registry

    ks = service(iam)
    [account] = [c.client_id for c in ks.list_clients()]
    fp = Fingerprinter("x" * 32)
    engine = Engine(ks, [registry.build("memory", {}, fp)], state, CapturePublisher(), fp, Policy())
    active = iam["keys"]["payments"][0]
    step = plan_one(engine, account, active, force=True, include_out_of_scope=False)
    assert step.action == "refuse" and "cannot be reset" in step.why
    result = engine.rotate(KeyRef(account, active), trigger="manual", force=True)
    assert result.status == "failed" and "nothing was sent" in result.reason
    assert state.attempts() == []
    keys = iam["client"].list_access_keys(UserName=iam["payments"])["AccessKeyMetadata"]
    assert {k["AccessKeyId"]: k["Status"] for k in keys} == {active: "Active", iam["keys"]["payments"][1]: "Inactive"}


def test_aws_iam_is_audit_only(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="audit"):
        settings_from_mapping({"keyservice": {"kind": "aws-iam"}, "policy": {"mode": "enforce"},
                               "sinks": [{"kind": "memory"}]})


def test_rotator_scan_reports_iam_keys(iam: dict[str, Any], env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keyservice]\nkind = "aws-iam"\nendpoint_url = "{iam["url"]}"\n'
                      f'user_path_prefix = "{iam["path"]}"\n[[sinks]]\nkind = "memory"\n')
    result = runner.invoke(app, ["scan", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    rows = {r["key_id"]: r for r in json.loads(result.stdout)}
    assert rows[iam["keys"]["legacy"][0]]["state"] == "excluded"
    assert rows[iam["keys"]["payments"][0]]["alias"] == iam["payments"]
