"""AWS IAM access keys as keys (`kind = "aws-iam"`), against moto's server with its authentication on.

The server runs in its own process (`tests.aws_helpers.MotoProcess`) with
`INITIAL_NO_AUTH_ACTION_COUNT=5`: the first five actions create, unauthenticated, an admin user
(inline `*:*` policy) and its access key, plus a same-named user and its key in a second account
(`x-moto-account-id`); every later request must be signed by a known key, so a wrong secret or a
deleted key really fails. The admin key is rotator's management credential.

Reading: keys listed with their users' tags, filtered, exempted, aged and paired; moto creates
keys "now", so "due" is evaluated 100 days on. Reset is refused with nothing sent. Writing (the
overlap strategy's side): create at the two-key limit, deactivate, delete, last use, and
verification by sts:GetCallerIdentity with its polling while IAM propagates (a proxy answers the
first calls with InvalidClientTokenId) and its Arn check.

moto's gaps met:
- without authentication (the default), GetCallerIdentity never fails: any key id and secret
  "work". Worked around: authentication on, as above.
- an Inactive key still authenticates (moto checks signatures, not the key's Status). Not worked
  around: no test relies on a deactivated key failing.
- list_users (and list_access_keys) ignore Marker/MaxItems and never truncate. Not worked around:
  paging of users is not exercised here.
- GetAccessKeyLastUsed finds keys of every account (IAM is not expected to) and moto
  marks a key as used by any request carrying its id, even one whose signature fails. The first
  lets the other account's key reach the Arn check; the second is avoided by signing correctly.
- IAM's propagation delay does not exist: a new key works at once. Worked around by the proxy.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bx
import pytest
from typer.testing import CliRunner

from rotator.cli import app
from rotator.config import settings_from_mapping
from rotator.domain import KeyState, LastUse, Replay, Secret
from rotator.errors import ConfigError, InDoubtError, NotFoundError, RefusedError
from rotator.keyservice.aws_iam import AwsIamKeyService
from rotator.policy import Policy
from rotator.runtime import build_keyservice
from rotator.scan import scan
from tests.aws_helpers import MotoProcess, QueryFaultProxy

DAY = 86_400
OTHER_ACCOUNT = "111122223333"
TWIN = "twin"  # a user name in both accounts
MEMORY = {"kind": "memory", "path": "{client_id}/{alias}"}  # IAM key ids change with every rotation
runner = CliRunner()


def client(url: str, name: str, key: tuple[str, str], region: str = "us-east-1") -> Any:
    return boto3.client(name, region_name=region, endpoint_url=url, aws_access_key_id=key[0],
                        aws_secret_access_key=key[1])


@pytest.fixture(scope="module")
def moto() -> Iterator[dict[str, Any]]:
    with MotoProcess(no_auth=5) as server:
        anonymous = client(server.url, "iam", ("testing", "testing"))
        anonymous.create_user(UserName="rotator-admin")
        anonymous.put_user_policy(UserName="rotator-admin", PolicyName="admin", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        admin = anonymous.create_access_key(UserName="rotator-admin")["AccessKey"]
        other = client(server.url, "iam", ("testing", "testing"))
        other.meta.events.register("before-sign.iam.*",
                                   lambda request, **_: request.headers.__setitem__("x-moto-account-id", OTHER_ACCOUNT))
        other.create_user(UserName=TWIN)
        twin = other.create_access_key(UserName=TWIN)["AccessKey"]
        admin_key = (admin["AccessKeyId"], admin["SecretAccessKey"])
        client(server.url, "iam", admin_key).create_user(UserName=TWIN)
        yield {"url": server.url, "admin": admin_key, "twin": (twin["AccessKeyId"], twin["SecretAccessKey"])}


@pytest.fixture(autouse=True)
def _management_credentials(moto: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """rotator's AWS credentials (boto3's environment chain) are the admin's key."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto["admin"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto["admin"][1])
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def iam(moto: dict[str, Any]) -> dict[str, Any]:
    """A private user path on the shared moto server, with users for every rule; `user` makes more."""
    iam_client = client(moto["url"], "iam", moto["admin"])
    path = f"/rt{uuid.uuid4().hex[:8]}/"
    made: dict[str, Any] = {"url": moto["url"], "path": path, "client": iam_client, "keys": {}}

    def user(name: str, tags: dict[str, str] | None = None, keys: int = 1) -> str:
        full = f"{name}-{path.strip('/')}"
        iam_client.create_user(UserName=full, Path=path,
                               Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()])
        made["keys"][name] = [iam_client.create_access_key(UserName=full)["AccessKey"]["AccessKeyId"]
                              for _ in range(keys)]
        made[name] = full
        return full

    made["user"] = user
    user("payments", {"rotator:managed": "true"}, keys=2)
    user("reports", {"rotator:environment": "sandbox"})
    user("legacy", {"rotator:exempt": "vendor integration, rotated by hand (JIRA-42)"})
    user("loose")
    user("idle")
    iam_client.update_access_key(UserName=made["idle"], AccessKeyId=made["keys"]["idle"][0], Status="Inactive")
    iam_client.create_group(GroupName=f"g-{path.strip('/')}")
    iam_client.add_user_to_group(GroupName=f"g-{path.strip('/')}", UserName=made["payments"])
    iam_client.update_access_key(UserName=made["payments"], AccessKeyId=made["keys"]["payments"][0],
                                 Status="Inactive")  # the previous key, kept until it is deleted
    return made


def service(iam: dict[str, Any], **options: Any) -> Any:
    config = settings_from_mapping({"keyservice": {"kind": "aws-iam", "endpoint_url": iam["url"],
                                                   "user_path_prefix": iam["path"], **options},
                                    "sinks": [MEMORY]}, environ={"ROTATOR_FINGERPRINT_KEY": "x" * 32})
    return build_keyservice(config.keyservice)


class FakeTime:
    """verify_secret's clock and sleep: waits are recorded and pass at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def writer(iam: dict[str, Any], url: str | None = None, grace_s: float = 7 * DAY, fake: FakeTime | None = None,
           **options: Any) -> tuple[AwsIamKeyService, str]:
    """The service with the runtime's keyword arguments, and its account."""
    config = settings_from_mapping({"keyservice": {"kind": "aws-iam", "endpoint_url": url or iam["url"],
                                                   "user_path_prefix": iam["path"], "max_attempts": 1, **options},
                                    "sinks": [MEMORY]}, environ={"ROTATOR_FINGERPRINT_KEY": "x" * 32})
    fake = fake or FakeTime()
    ks = AwsIamKeyService(config.keyservice, grace_s=grace_s, sleep=fake.sleep, clock=fake.clock)
    return ks, ks.account()


def statuses(iam: dict[str, Any], user: str) -> dict[str, str]:
    keys = iam["client"].list_access_keys(UserName=user)["AccessKeyMetadata"]
    return {k["AccessKeyId"]: k["Status"] for k in keys}


# --- the harness -------------------------------------------------------------------------------
def test_moto_checks_signatures(moto: dict[str, Any]) -> None:
    with pytest.raises(bx.ClientError, match="InvalidClientTokenId"):
        client(moto["url"], "iam", ("testing", "testing")).list_users()
    with pytest.raises(bx.ClientError, match="SignatureDoesNotMatch"):
        client(moto["url"], "sts", (moto["admin"][0], "not-the-secret")).get_caller_identity()


# --- reading -----------------------------------------------------------------------------------
def test_access_keys_are_listed_with_their_users_tags(iam: dict[str, Any]) -> None:
    """Alias = user name, environment from the tag, a lone Inactive key out of scope, one its
    user's newer key replaces retiring, the exemption tag excludes with its reason; 100 days on
    (moto creates keys now, so the scan looks from later), the active production key is due."""
    ks = service(iam)
    [account] = [c.client_id for c in ks.list_clients()]
    rows = {r.key.key_id: r for r in scan(ks, Policy(), time.time() + 100 * DAY)}
    inactive, active = iam["keys"]["payments"]
    assert rows[active].key.alias == iam["payments"] and rows[active].state is KeyState.DUE
    assert rows[active].key.client_id == account and rows[active].key.status == "ACTIVE"
    assert rows[inactive].state is KeyState.RETIRING and rows[inactive].key.status == "INACTIVE"
    assert rows[iam["keys"]["idle"][0]].state is KeyState.OUT_OF_SCOPE
    assert rows[iam["keys"]["reports"][0]].state is KeyState.OUT_OF_SCOPE  # SANDBOX
    legacy = rows[iam["keys"]["legacy"][0]]
    assert legacy.state is KeyState.EXCLUDED and "JIRA-42" in str(legacy.key.exempt)
    assert rows[iam["keys"]["loose"][0]].state is KeyState.DUE
    assert ks.get_key(account, active).alias == iam["payments"]


def test_a_users_two_keys_are_paired_oldest_first(iam: dict[str, Any]) -> None:
    """The older key is `replaced_by` the newer, which `replaces` it; a lone key is in no pair."""
    ks = service(iam)
    [account] = [c.client_id for c in ks.list_clients()]
    keys = {k.key_id: k for k in ks.list_keys(account)}
    older, newer = iam["keys"]["payments"]
    assert (keys[older].replaced_by, keys[older].replaces) == (newer, None)
    assert (keys[newer].replaces, keys[newer].replaced_by) == (older, None)
    lone = keys[iam["keys"]["loose"][0]]
    assert (lone.replaces, lone.replaced_by) == (None, None)
    assert {k.provider for k in keys.values()} == {"aws-iam"}
    assert ks.get_key(account, newer).replaces == older and ks.get_key(account, older).replaced_by == newer


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


def test_a_reset_is_refused_before_anything_is_sent(iam: dict[str, Any]) -> None:
    """An access key cannot be reset: the adapter says so (the engine then overlaps) and refuses
    a reset without a call to IAM."""
    with QueryFaultProxy(iam["url"]) as proxy:
        ks, account = writer(iam, url=proxy.url)
        assert "cannot be reset" in ks.cannot_reset and "overlap" in ks.cannot_reset
        proxy.seen.clear()
        with pytest.raises(RefusedError, match="nothing was sent"):
            ks.reset_key(account, iam["keys"]["payments"][1], "ik")
        assert not proxy.seen
    assert statuses(iam, iam["payments"]) == {iam["keys"]["payments"][0]: "Inactive",
                                              iam["keys"]["payments"][1]: "Active"}


def test_aws_iam_sink_places_are_named_by_alias(env: pytest.MonkeyPatch) -> None:
    """Enforce mode is allowed; a sink place named by the key id is not (every rotation makes a new one)."""
    settings_from_mapping({"keyservice": {"kind": "aws-iam"}, "policy": {"mode": "enforce"}, "sinks": [MEMORY]})
    with pytest.raises(ConfigError, match="names the key id"):
        settings_from_mapping({"keyservice": {"kind": "aws-iam"}, "policy": {"mode": "enforce"},
                               "sinks": [{"kind": "memory"}]})


def test_rotator_scan_reports_iam_keys(iam: dict[str, Any], env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "rotator.toml"
    config.write_text(f'[keyservice]\nkind = "aws-iam"\nendpoint_url = "{iam["url"]}"\n'
                      f'user_path_prefix = "{iam["path"]}"\n[[sinks]]\nkind = "memory"\npath = "{{client_id}}/{{alias}}"\n')
    result = runner.invoke(app, ["scan", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    rows = {r["key_id"]: r for r in json.loads(result.stdout)}
    assert rows[iam["keys"]["legacy"][0]]["state"] == "excluded"
    assert rows[iam["keys"]["payments"][0]]["alias"] == iam["payments"]


# --- creating a successor ------------------------------------------------------------------------
def test_create_issues_a_working_successor(iam: dict[str, Any]) -> None:
    ks, account = writer(iam)
    [old] = iam["keys"]["loose"]
    issued = ks.create_key(account, iam["loose"], (), "ik-ignored", replaces=old)
    new = issued.key
    assert (new.alias, new.replaces, new.provider, new.status) == (iam["loose"], old, "aws-iam", "ACTIVE")
    assert set(statuses(iam, iam["loose"])) == {old, new.key_id}
    assert ks.verify_secret(account, issued.secret, new.key_id) is True
    assert ks.get_key(account, old).replaced_by == new.key_id


def test_create_at_the_limit_deletes_an_inactive_key_past_its_delete_time(iam: dict[str, Any]) -> None:
    """The previous rotation's key, Inactive, and deletable since the current key's CreateDate
    plus the grace and delete_after_s (both 0 here), makes room."""
    iam["user"]("svc", keys=2)
    retired, current = iam["keys"]["svc"]
    iam["client"].update_access_key(UserName=iam["svc"], AccessKeyId=retired, Status="Inactive")
    ks, account = writer(iam, grace_s=0, delete_after_s=0)
    issued = ks.create_key(account, iam["svc"], (), "ik", replaces=current)
    assert statuses(iam, iam["svc"]) == {current: "Active", issued.key.key_id: "Active"}


def test_create_refuses_two_active_keys(iam: dict[str, Any]) -> None:
    older, newer = iam["keys"]["payments"]
    iam["client"].update_access_key(UserName=iam["payments"], AccessKeyId=older, Status="Active")
    ks, account = writer(iam, grace_s=0, delete_after_s=0)
    with pytest.raises(RefusedError) as refused:
        ks.create_key(account, iam["payments"], (), "ik", replaces=older)
    assert iam["payments"] in str(refused.value) and older in str(refused.value) and newer in str(refused.value)
    assert statuses(iam, iam["payments"]) == {older: "Active", newer: "Active"}


def test_create_refuses_an_inactive_key_not_yet_past_its_delete_time(iam: dict[str, Any]) -> None:
    iam["user"]("svc", keys=2)
    retired, current = iam["keys"]["svc"]
    iam["client"].update_access_key(UserName=iam["svc"], AccessKeyId=retired, Status="Inactive")
    ks, account = writer(iam)  # a week's grace, a week more before deletion
    with pytest.raises(RefusedError, match=f"{iam['svc']}.*{retired}") as refused:
        ks.create_key(account, iam["svc"], (), "ik", replaces=current)
    assert "nothing was created" in str(refused.value)
    assert statuses(iam, iam["svc"]) == {retired: "Inactive", current: "Active"}


def test_create_refuses_a_replaced_key_that_is_not_the_users(iam: dict[str, Any]) -> None:
    ks, account = writer(iam)
    with pytest.raises(RefusedError, match="not an access key of"):
        ks.create_key(account, iam["loose"], (), "ik", replaces=iam["keys"]["reports"][0])
    assert list(statuses(iam, iam["loose"])) == iam["keys"]["loose"]


@pytest.mark.parametrize(("code", "status"), [("AccessDenied", 403), ("LimitExceeded", 409)])
def test_a_create_answered_4xx_is_refused(iam: dict[str, Any], code: str, status: int) -> None:
    with QueryFaultProxy(iam["url"]) as proxy:
        ks, account = writer(iam, url=proxy.url)
        proxy.fail("CreateAccessKey", code, status=status)
        with pytest.raises(RefusedError) as refused:
            ks.create_key(account, iam["loose"], (), "ik", replaces=iam["keys"]["loose"][0])
    assert refused.value.status == status and code in str(refused.value)
    assert list(statuses(iam, iam["loose"])) == iam["keys"]["loose"]


def test_a_create_for_an_unknown_user_is_refused(iam: dict[str, Any]) -> None:
    ks, account = writer(iam)
    with pytest.raises(RefusedError, match="nothing was created"):
        ks.create_key(account, "nobody-" + iam["path"].strip("/"), (), "ik")


@pytest.mark.parametrize("status", [500, 0], ids=["5xx", "dropped"])
def test_a_create_without_an_answer_is_in_doubt_and_not_retried(iam: dict[str, Any], status: int) -> None:
    """The key may exist: InDoubtError, and no second CreateAccessKey (botocore's retry would make
    another key, or fail on the limit the first one filled)."""
    with QueryFaultProxy(iam["url"]) as proxy:
        ks, account = writer(iam, url=proxy.url, max_attempts=5)
        proxy.fail("CreateAccessKey", "InternalFailure", status=status)
        with pytest.raises(InDoubtError):
            ks.create_key(account, iam["loose"], (), "ik", replaces=iam["keys"]["loose"][0])
        assert proxy.seen["CreateAccessKey"] == 1


def test_replays_hold_nothing(iam: dict[str, Any]) -> None:
    ks, account = writer(iam)
    key = iam["keys"]["loose"][0]
    assert ks.replay_create(account, key, "ik").kind is Replay.EMPTY
    assert ks.replay(account, key, "ik").kind is Replay.EMPTY


# --- retiring -----------------------------------------------------------------------------------
def test_deactivate_then_revoke(iam: dict[str, Any]) -> None:
    ks, account = writer(iam)
    [key] = iam["keys"]["loose"]
    ks.deactivate_key(account, key)
    assert ks.get_key(account, key).status == "INACTIVE"
    ks.revoke_key(account, key)
    assert statuses(iam, iam["loose"]) == {}
    with pytest.raises(NotFoundError):
        ks.revoke_key(account, key)
    with pytest.raises(NotFoundError):
        ks.deactivate_key(account, key)
    with pytest.raises(NotFoundError):
        ks.get_key(account, key)


def test_last_used_names_the_service_and_region(iam: dict[str, Any]) -> None:
    """A new key was never used; verifying it signs at the configured region."""
    ks, account = writer(iam, region="eu-west-1")
    issued = ks.create_key(account, iam["loose"], (), "ik", replaces=iam["keys"]["loose"][0])
    assert ks.last_used(account, issued.key.key_id) is None
    assert ks.verify_secret(account, issued.secret, issued.key.key_id)
    used = ks.last_used(account, issued.key.key_id)
    assert isinstance(used, LastUse) and (used.service, used.region) == ("sts", "eu-west-1")
    assert abs(used.when - time.time()) < 60
    with pytest.raises(NotFoundError):
        ks.last_used(account, "AKIAIOSFODNN7NOTTHERE")


# --- verifying a secret ----------------------------------------------------------------------------
def test_a_wrong_secret_fails_verification_within_its_bound(iam: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeTime()
    ks, account = writer(iam, fake=fake, verify_timeout_s=3)
    wrong = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYnotTheSecret"
    assert ks.verify_secret(account, Secret(wrong), iam["keys"]["loose"][0]) is False
    assert fake.slept == [0.5, 1.0, 1.5]  # SignatureDoesNotMatch may be propagation: polled, then given up
    assert wrong not in caplog.text


def test_a_deleted_key_fails_verification(iam: dict[str, Any]) -> None:
    ks, account = writer(iam, verify_timeout_s=1)
    made = iam["client"].create_access_key(UserName=iam["loose"])["AccessKey"]
    assert ks.verify_secret(account, Secret(made["SecretAccessKey"]), made["AccessKeyId"]) is True
    iam["client"].delete_access_key(UserName=iam["loose"], AccessKeyId=made["AccessKeyId"])
    assert ks.verify_secret(account, Secret(made["SecretAccessKey"]), made["AccessKeyId"]) is False


def test_the_arn_is_checked(iam: dict[str, Any], moto: dict[str, Any]) -> None:
    """The other account's `twin` key authenticates (STS names that account's user), but this
    account's `twin` is another user: not verified."""
    ks, account = writer(iam)
    other = client(moto["url"], "sts", moto["twin"]).get_caller_identity()
    assert other["Arn"] == f"arn:aws:iam::{OTHER_ACCOUNT}:user/{TWIN}"
    assert ks.verify_secret(account, Secret(moto["twin"][1]), moto["twin"][0]) is False
    assert ks.verify_secret(account, Secret(moto["admin"][1]), moto["admin"][0]) is True


def test_verification_polls_while_iam_propagates(iam: dict[str, Any]) -> None:
    """A new key is refused for a while: back-off from 0.5 s doubling to a 5 s cap."""
    fake = FakeTime()
    with QueryFaultProxy(iam["url"]) as proxy:
        ks, account = writer(iam, url=proxy.url, fake=fake)
        issued = ks.create_key(account, iam["loose"], (), "ik", replaces=iam["keys"]["loose"][0])
        proxy.seen.clear()
        proxy.fail("GetCallerIdentity", "InvalidClientTokenId", status=403, times=4)
        proxy.fail("GetCallerIdentity", "SignatureDoesNotMatch", status=403, times=2)
        assert ks.verify_secret(account, issued.secret, issued.key.key_id) is True
        assert proxy.seen["GetCallerIdentity"] == 7
    assert fake.slept == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_verification_gives_up_at_its_bound(iam: dict[str, Any]) -> None:
    """A bound shorter than the propagation: False; the last try is at the bound."""
    fake = FakeTime()
    with QueryFaultProxy(iam["url"]) as proxy:
        ks, account = writer(iam, url=proxy.url, fake=fake, verify_timeout_s=3)
        issued = ks.create_key(account, iam["loose"], (), "ik", replaces=iam["keys"]["loose"][0])
        proxy.seen.clear()
        proxy.fail("GetCallerIdentity", "InvalidClientTokenId", status=403, times=4)
        assert ks.verify_secret(account, issued.secret, issued.key.key_id) is False
        assert proxy.seen["GetCallerIdentity"] == 4
    assert fake.slept == [0.5, 1.0, 1.5]


def test_verification_waits_in_real_time_by_default(iam: dict[str, Any]) -> None:
    config = settings_from_mapping({"keyservice": {"kind": "aws-iam", "endpoint_url": iam["url"],
                                                   "verify_timeout_s": 0.3}, "sinks": [MEMORY]},
                                   environ={"ROTATOR_FINGERPRINT_KEY": "x" * 32})
    ks = AwsIamKeyService(config.keyservice)
    started = time.monotonic()
    assert ks.verify_secret(ks.account(), Secret("not-the-secret"), iam["keys"]["loose"][0]) is False
    assert 0.3 <= time.monotonic() - started < 2


def test_iam_calls_of_every_process_share_one_paced_rate(iam: dict[str, Any], state: Any) -> None:
    """IAM publishes no rate-limit headers: `requests_per_second` and `burst` pace every process
    together (rotator.budget's shared token bucket). Past the burst, another process's IAM call is
    held back before botocore sends it (the engine defers its key); STS's token check is not IAM's."""
    from rotator.budget import RateBudget
    from rotator.errors import BudgetSpent

    first, _ = writer(iam)
    second, _ = writer(iam)
    for ks in (first, second):
        ks.budget = RateBudget(state.client, state.ns, requests_per_second=1, burst=3, longest_wait_s=0,
                               clock=lambda: 1_000_000.0)
    sent: list[str] = []
    second._iam.meta.events.register("before-send.iam.*", lambda **_: sent.append("iam"))
    for _ in range(3):
        first._iam.list_users(PathPrefix=iam["path"])
    with pytest.raises(BudgetSpent, match="requests_per_second"):
        second._iam.list_users(PathPrefix=iam["path"])
    assert sent == []  # held back before anything went
    assert second._sts.get_caller_identity()["Account"]  # STS is not paced by IAM's rate
