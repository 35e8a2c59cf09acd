"""The overlap strategy end to end with AWS IAM access keys: the real engine, the real
`AwsIamKeyService` against moto's server with authentication on (one process for this module,
the fixtures of tests/test_aws_iam.py), real Redis, a memory sink whose place is
`{client_id}/{alias}` and, in some tests, the AWS Secrets Manager sink on the same moto server
(`rotator/{client_id}/{alias}`). Every test checks IAM itself (ListAccessKeys with the management
key) and what the sinks hold.

The clock trick: moto stamps every access key with the real "now" and cannot be told otherwise,
so time moves on the engine's side only. The engine's clock is `time.time() + clock.shift`:
- `shift = 100 days` makes a key moto created a moment ago look 100 days old: it is due;
- the grace counts from when every sink held the successor, on the engine's clock (100 days
  ahead): once it exists, `shift = 100 days + 0` is "just after the rotation", `+ 8 days` "after
  the 7-day grace", `+ 10 days` "after the deactivated key's delete time" (`delete_after_s` is 2
  days here);
- moto stamps a key's last use with the real time; the in-use test reads it in the engine's frame
  (the use happens at the engine's "now").
The adapter's own clock serves verify_secret's polling only (a `FakeTime`: its waits pass at
once). Its two-key check (`_make_room`) reads the real time, so a deactivated key past its delete
time cannot be simulated there; no test relies on it.

The keys rotated here are made once for the module (`pool`), at least a second before any
rotation: IAM dates have one-second resolution, and a successor created within the second of the
key it replaces has the same dates, which the engine reports as `keyservice.protocol_error`
("did not move the key's LastResetDate"), a case real rotations (days apart) never meet.

moto facts met here (besides those in tests/test_aws_iam.py): moto enforces IAM's two keys per
user (LimitExceeded), so "never more than two keys" is also guarded by moto itself; any request
carrying a key id marks that key used (service, region, now), which is how a consumer still on the
old key is simulated; Secrets Manager checks signatures too, and the AWS sink works with the
management key from the environment (its `*:*` policy).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.exceptions as bx
import pytest
from typer.testing import CliRunner

from rotator import logs
from rotator.cli import app
from rotator.domain import ApiKey, KeyRef, Secret
from rotator.engine import Engine, RotationResult
from rotator.events import CapturePublisher
from rotator.places import due_with_places
from rotator.policy import Policy
from rotator.protocol import DEFAULT_HORIZON_S
from rotator.protocols import SecretRecord
from rotator.scan import scan
from rotator.sinks import registry
from rotator.state import RedisState
from tests import test_aws_iam
from tests.aws_helpers import CuttingQueryProxy, QueryFaultProxy
from tests.conftest import redis_text
from tests.test_aws_iam import DAY, FakeTime, client, statuses, writer
from tests.test_engine import FP
from tests.test_overlap import Clock

# tests/test_aws_iam.py's fixtures, used here too: the module-scoped `moto` is this module's own
# server process, `iam` a private user path on it, and the management key in the environment.
moto = test_aws_iam.moto
iam = test_aws_iam.iam
_management_credentials = test_aws_iam._management_credentials

GRACE = 7 * DAY
DELETE_AFTER = 2 * DAY
POLICY = Policy(strategy="overlap", overlap_grace_s=GRACE)
DUE = 100 * DAY  # the shift that makes a key moto created now due (max_age_days is 90)
AFTER_GRACE = GRACE + DAY
AFTER_DELETE = GRACE + DELETE_AFTER + DAY
WRITES = ("CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey")
EXEMPT = "vendor integration, rotated by hand (JIRA-42)"
# Users made once for the module: name -> (access keys, tags)
POOL: dict[str, tuple[int, dict[str, str]]] = {
    "svc1": (1, {}), "svc2": (1, {}), "svc3": (1, {}), "svc8": (1, {}), "slow": (1, {}), "too-slow": (1, {}),
    "lost": (1, {}), "lost-recovered": (1, {}), "person-during-doubt": (1, {}), "refused": (1, {}),
    "exempt": (1, {"rotator:exempt": EXEMPT}),
    "pair-older": (2, {}), "pair-nothing": (2, {}), "pair-create": (2, {}), "pair-create-reason": (2, {}),
}
runner = CliRunner()

User = tuple[str, list[tuple[str, str]]]  # user name, its keys (id, secret) oldest first


@pytest.fixture(scope="module")
def pool(moto: dict[str, Any]) -> dict[str, User]:
    """Users with their keys' secrets (a person made them: no sink holds them), made at the start,
    then a wait into the next second (see the module's docstring)."""
    admin = client(moto["url"], "iam", moto["admin"])
    made: dict[str, User] = {}
    for name, (count, tags) in POOL.items():
        user = f"{name}-{uuid.uuid4().hex[:8]}"
        admin.create_user(UserName=user, Path="/rtpool/", Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        keys = [admin.create_access_key(UserName=user)["AccessKey"] for _ in range(count)]
        made[name] = (user, [(k["AccessKeyId"], k["SecretAccessKey"]) for k in keys])
    time.sleep(1.05 - time.time() % 1)
    return made


class Rig:
    """The engine over the real adapter (grace = the policy's), with what a test looks at."""

    def __init__(self, iam: dict[str, Any], state: RedisState, *, url: str | None = None,
                 sinks: list[Any] | None = None, horizon_s: float = DEFAULT_HORIZON_S, **options: Any) -> None:
        options = {"delete_after_s": DELETE_AFTER, "verify_timeout_s": 1, **options}
        self.iam = iam
        self.fake = FakeTime()
        self.ks, self.account = writer(iam, url=url, grace_s=POLICY.overlap_grace_s, fake=self.fake, **options)
        self.sinks = sinks or [memory_sink()]
        self.events = CapturePublisher()
        self.clock = Clock()
        self.results: list[RotationResult] = []
        self.engine = Engine(self.ks, self.sinks, state, self.events, FP, POLICY, clock=self.clock,
                             horizon_s=horizon_s)

    def rotate(self, key_id: str, **kw: Any) -> RotationResult:
        result = self.engine.rotate(KeyRef(self.account, key_id), trigger="test", **kw)
        self.results.append(result)
        return result

    def key(self, key_id: str) -> ApiKey:
        return self.ks.get_key(self.account, key_id)

    def named(self, name: str) -> list[Any]:
        return [e for e in self.events.events if e.name == name]

    def close(self) -> None:
        self.engine.close()
        self.ks.close()


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


@pytest.fixture
def make(iam: dict[str, Any], state: RedisState, rigs: list[Rig]) -> Any:
    def build(**kw: Any) -> Rig:
        rig = Rig(iam, state, **kw)
        rigs.append(rig)
        return rig

    return build


def memory_sink() -> Any:
    return registry.build("memory", {"path": "{client_id}/{alias}"}, FP)


def aws_sink(url: str) -> Any:
    return registry.build("aws", {"region": "us-east-1", "endpoint_url": url, "name": "rotator/{client_id}/{alias}"},
                          FP)


def stored_document(sink: Any, key: ApiKey) -> dict[str, Any] | None:
    """The document at the key's place (it holds the secret: for tests only); None when empty."""
    if hasattr(sink, "read_document"):
        try:
            document: dict[str, Any] = sink.read_document(key)
        except bx.ClientError:
            return None
        return document
    versions = sink.versions(key)
    return dict(versions[-1]) if versions else None


def the_other(iam: dict[str, Any], user: str, old: str) -> str:
    [new] = [k for k in statuses(iam, user) if k != old]
    return new


def authenticates(url: str, pair: tuple[str, str], region: str = "us-east-1") -> str | None:
    """The Arn STS names for a key and secret; None when they do not authenticate."""
    try:
        return str(client(url, "sts", pair, region).get_caller_identity()["Arn"])
    except bx.ClientError:
        return None


def holds_successor(rig: Rig, user: str, new: str) -> str:
    """Every sink's document is the successor's, with its id and secret under AWS's names and
    under `api_key`, and that pair authenticates as the user: its secret."""
    arn = rig.iam["client"].get_user(UserName=user)["User"]["Arn"]
    key = rig.key(new)
    secrets = set()
    for sink in rig.sinks:
        document = stored_document(sink, key)
        assert document is not None, sink.describe()
        assert document["key_id"] == document["access_key_id"] == new
        assert document["alias"] == user and document["client_id"] == rig.account
        assert document["secret_access_key"] == document["api_key"] == sink.read_secret(key).reveal()
        assert authenticates(rig.iam["url"], (new, document["secret_access_key"])) == arn
        secrets.add(document["secret_access_key"])
    [secret] = secrets
    return str(secret)


# --- 1. a due key gets a successor, stored and working ----------------------------------------------
def test_a_due_key_gets_a_successor_stored_in_every_sink_that_authenticates(
    make: Any, pool: dict[str, User], state: RedisState, moto: dict[str, Any],
) -> None:
    rig = make(sinks=[memory_sink(), aws_sink(moto["url"])])
    user, [(old, old_secret)] = pool["svc1"]
    rig.clock.shift = DUE

    result = rig.rotate(old)
    assert result.status == "succeeded", result.reason
    new = the_other(rig.iam, user, old)
    assert statuses(rig.iam, user) == {old: "Active", new: "Active"}
    assert rig.key(new).replaces == old and rig.key(old).replaced_by == new
    holds_successor(rig, user, new)
    assert authenticates(rig.iam["url"], (old, old_secret)) is not None  # the old key works during the grace
    assert state.attempts() == []
    assert rig.events.names() == ["rotation.succeeded", "key.retiring"], [e.error for e in rig.events.events]
    [retiring] = rig.named("key.retiring")
    assert retiring.key_id == old and dict(retiring.details or {})["successor"] == new
    assert f"successor {new} stored" in result.reason


# --- 2. the old key: kept in the grace, deactivated after it, deleted delete_after_s later ------------
def test_the_old_key_is_kept_in_the_grace_deactivated_after_it_and_deleted_later(
    make: Any, pool: dict[str, User],
) -> None:
    rig = make()
    user, [(old, old_secret)] = pool["svc2"]
    rig.clock.shift = DUE
    assert rig.rotate(old).status == "succeeded"
    new = the_other(rig.iam, user, old)

    for shift in (0, GRACE - 3600):  # just after the rotation, an hour before the grace ends
        rig.clock.shift = DUE + shift
        waiting = rig.rotate(old)
        assert waiting.status == "skipped" and "retiring: deactivated after" in waiting.reason, waiting.reason
        assert statuses(rig.iam, user) == {old: "Active", new: "Active"}

    rig.clock.shift = DUE + AFTER_GRACE
    off = rig.rotate(old)
    assert off.status == "succeeded" and off.reason == f"deactivated; replaced by {new}", off.reason
    assert statuses(rig.iam, user) == {old: "Inactive", new: "Active"}
    [deactivated] = rig.named("key.deactivated")
    assert deactivated.key_id == old and dict(deactivated.details or {})["successor"] == new
    kept = rig.rotate(old)  # within delete_after_s: a person may still switch it back on
    assert kept.status == "skipped" and "retiring: deleted after" in kept.reason, kept.reason
    assert statuses(rig.iam, user) == {old: "Inactive", new: "Active"}

    rig.clock.shift = DUE + AFTER_DELETE
    gone = rig.rotate(old)
    assert gone.status == "succeeded" and gone.reason == f"revoked; replaced by {new}", gone.reason
    assert statuses(rig.iam, user) == {new: "Active"}
    assert [e.key_id for e in rig.named("key.revoked")] == [old]
    assert authenticates(rig.iam["url"], (old, old_secret)) is None
    holds_successor(rig, user, new)
    rig.clock.shift = 0  # the successor is as old as moto says: not due
    assert rig.rotate(new).reason == "not due"
    again = rig.rotate(old)  # a late trigger finds nothing to do and deletes nothing else
    assert again.status == "failed" and again.reason == f"no access key {old} in account {rig.account}"
    assert statuses(rig.iam, user) == {new: "Active"}


# --- 3. a key still in use is not deactivated --------------------------------------------------------
def test_an_old_key_used_after_its_successor_was_stored_is_not_deactivated(make: Any, pool: dict[str, User]) -> None:
    """A consumer still signs with the old key after the successor was stored (moto records the
    use): past the grace, GetAccessKeyLastUsed stops the deactivation and says where it was used."""
    rig = make()
    user, [(old, old_secret)] = pool["svc3"]
    rig.clock.shift = DUE
    assert rig.rotate(old).status == "succeeded"
    new = the_other(rig.iam, user, old)
    assert authenticates(rig.iam["url"], (old, old_secret), region="eu-west-1")  # a consumer not yet moved
    # moto stamps the use with the real time; the engine lives `shift` ahead, where that use is "now".
    real_last_used = rig.ks.last_used
    rig.ks.last_used = lambda client, key: (lambda use: use and replace(use, when=use.when + rig.clock.shift))(
        real_last_used(client, key))

    rig.clock.shift = DUE + AFTER_GRACE
    refused = rig.rotate(old)
    assert refused.status == "failed", refused.reason
    assert "(sts, eu-west-1)" in refused.reason and "not deactivated" in refused.reason
    [in_use] = rig.named("key.still_in_use")
    assert in_use.key_id == old and in_use.severity == "error"
    details = dict(in_use.details or {})
    assert (details["service"], details["region"]) == ("sts", "eu-west-1") and details["last_used"]
    assert statuses(rig.iam, user) == {old: "Active", new: "Active"}
    assert rig.named("key.deactivated") == []


# --- 4. two Active keys rotator did not make ---------------------------------------------------------
@pytest.mark.parametrize("held", ["older", "nothing"])
def test_two_active_keys_not_made_by_rotator_are_never_guessed_about(
    make: Any, pool: dict[str, User], held: str,
) -> None:
    """A person made a second key: the pair looks like a key and its successor, but the sinks do
    not hold the newer one, so the older is not deactivated (though its "grace" is long over)."""
    rig = make()
    user, [(older, older_secret), (newer, _)] = pool[f"pair-{held}"]
    sink = rig.sinks[0]
    if held == "older":
        key = rig.key(older)
        secret = Secret(older_secret)
        sink.write(SecretRecord(key, secret, "a2-by-hand", FP(secret), float(key.born_at)), sink.prepare(key))
    before = stored_document(sink, rig.key(older))
    rig.clock.shift = DUE

    result = rig.rotate(older)
    assert result.status == "failed", result.reason
    assert result.reason == f"not revoked: memory:default/{rig.account}/{newer} does not hold successor {newer}"
    [alert] = rig.named("rotation.failed")
    assert alert.key_id == older and alert.severity == "error" and newer in str(alert.error)
    assert statuses(rig.iam, user) == {older: "Active", newer: "Active"}
    assert stored_document(sink, rig.key(older)) == before


def test_a_create_needed_at_two_active_keys_creates_and_changes_nothing(
    make: Any, pool: dict[str, User], iam: dict[str, Any],
) -> None:
    """The newer of two Active keys is due: a successor would be a third key. The adapter refuses
    before sending anything: no key is created, none deactivated, no sink written, and the alert
    says why (the engine files it as a failure: see the next test)."""
    proxy = QueryFaultProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url)
        user, [(older, _), (newer, _)] = pool["pair-create"]
        rig.clock.shift = DUE
        for _ in range(2):  # a second trigger: still nothing sent
            result = rig.rotate(newer)
            assert not result.ok, result.reason
        assert not any(proxy.seen[w] for w in WRITES), proxy.seen
        assert stored_document(rig.sinks[0], rig.key(newer)) is None
    alerts = [e for e in rig.events.events if e.severity in ("error", "critical")]
    assert alerts and f"user {user} has two access keys" in str(alerts[0].error), alerts
    assert "nothing was created" in str(alerts[0].error)
    assert statuses(rig.iam, user) == {older: "Active", newer: "Active"}
    assert "key.retiring" not in rig.events.names()


@pytest.mark.parametrize("refusal", ["two-active-keys", "AccessDenied"])
def test_a_refused_create_fails_and_leaves_no_attempt(
    make: Any, pool: dict[str, User], iam: dict[str, Any], state: RedisState, refusal: str,
) -> None:
    """docs/strategies.md: "Two Active keys are never guessed about: the rotation fails with an
    alert." A create IAM refuses (403: rotator's policy lacks iam:CreateAccessKey) proves the same."""
    proxy = QueryFaultProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url)
        if refusal == "two-active-keys":
            user, [_, (key_id, _)] = pool["pair-create-reason"]
        else:
            user, [(key_id, _)] = pool["refused"]
            proxy.fail("CreateAccessKey", "AccessDenied", status=403)
        rig.clock.shift = DUE
        result = rig.rotate(key_id)
        assert len(statuses(rig.iam, user)) == (2 if refusal == "two-active-keys" else 1)  # nothing created
        assert result.status == "failed", (result.status, result.reason)
        assert "nothing was created" in result.reason
        assert state.attempts() == []


# --- 5. a lost create: the orphan is deleted, a new successor made -----------------------------------
def test_a_lost_create_deletes_the_key_nobody_holds_and_creates_again(
    make: Any, pool: dict[str, User], iam: dict[str, Any], state: RedisState,
) -> None:
    """CreateAccessKey ran at IAM and its answer was cut: a key exists whose secret nobody has.
    Past the horizon (0 here) it is a successor no sink holds: deleted, the epoch burnt, and the
    next rotation creates a new successor. The user never has more than two keys."""
    user, [(old, _)] = pool["lost"]
    proxy = CuttingQueryProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url, horizon_s=0.0)
        proxy.cut("CreateAccessKey")
        rig.clock.shift = DUE
        first = rig.rotate(old)
        assert first.status == "failed", first.reason
        [(operation, answer)] = proxy.lost
        orphan = re.search(rb"<AccessKeyId>(\w+)</AccessKeyId>", answer).group(1).decode()  # type: ignore[union-attr]
        assert operation == "CreateAccessKey" and orphan != old
        assert statuses(rig.iam, user) == {old: "Active"}  # the orphan is deleted already
        assert state.attempts() == []
        assert {"rotation.in_doubt", "rotation.secret_at_risk", "rotation.failed"} <= set(rig.events.names())
        assert rig.engine.recover_all() == []  # nothing outstanding

        second = rig.rotate(old)
        assert second.status == "succeeded", second.reason
        new = the_other(rig.iam, user, old)
        assert new != orphan and statuses(rig.iam, user) == {old: "Active", new: "Active"}
        holds_successor(rig, user, new)
        assert (proxy.seen["CreateAccessKey"], proxy.seen["DeleteAccessKey"]) == (2, 1)


def test_a_create_in_doubt_is_settled_by_recovery_past_the_horizon(
    make: Any, pool: dict[str, User], iam: dict[str, Any], state: RedisState,
) -> None:
    """The same, found by recovery: within the horizon the attempt stays in doubt and nothing is
    created again (the user holds the orphan and the old key: IAM's limit); past it, `recover_all`
    deletes the orphan and creates and stores the successor."""
    user, [(old, _)] = pool["lost-recovered"]
    proxy = CuttingQueryProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url)  # the default horizon
        proxy.cut("CreateAccessKey")
        rig.clock.shift = DUE
        for _ in range(2):
            doubt = rig.rotate(old)
            assert doubt.status == "in_doubt", doubt.reason
        orphan = the_other(rig.iam, user, old)
        assert statuses(rig.iam, user) == {old: "Active", orphan: "Active"}
        [pending] = state.attempts()
        assert pending.action == "create" and proxy.seen["CreateAccessKey"] == 1

        later = make(url=proxy.url, horizon_s=0.0)  # a recovery run once the horizon has passed
        later.clock.shift = DUE
        [recovered] = later.engine.recover_all()
        assert recovered.status == "succeeded", recovered.reason
        new = the_other(rig.iam, user, old)
        assert new != orphan and statuses(rig.iam, user) == {old: "Active", new: "Active"}
        holds_successor(later, user, new)
        assert state.attempts() == []
        assert (proxy.seen["CreateAccessKey"], proxy.seen["DeleteAccessKey"]) == (2, 1)
        assert "key.retiring" in later.events.names()


def test_recovery_never_deletes_a_key_its_create_did_not_make(
    make: Any, pool: dict[str, User], iam: dict[str, Any],
) -> None:
    """The create's connection dropped before IAM got it (nothing created, in doubt); meanwhile a
    person creates the user's second key and a consumer uses it. Past the horizon, that key is
    not a successor nobody holds: it is used, and made after the doubt began."""
    user, [(old, _)] = pool["person-during-doubt"]
    proxy = QueryFaultProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url)
        proxy.fail("CreateAccessKey", "InternalFailure", status=0)  # dropped before it reached IAM
        rig.clock.shift = DUE
        assert rig.rotate(old).status == "in_doubt"
        assert statuses(iam, user) == {old: "Active"}
        made = iam["client"].create_access_key(UserName=user)["AccessKey"]
        person = made["AccessKeyId"]
        assert authenticates(iam["url"], (person, made["SecretAccessKey"]))  # in use
        later = make(url=proxy.url, horizon_s=0.0)
        later.clock.shift = DUE
        later.engine.recover_all()
        assert person in statuses(iam, user), "the person's key, in use, was deleted"


# --- 6. IAM's propagation delay -----------------------------------------------------------------------
@pytest.mark.parametrize(("timeout_s", "refusals", "status", "slept"), [
    (30, 3, "succeeded", [0.5, 1.0, 2.0]),
    (1, 10, "failed", [0.5, 0.5]),  # the bound below the delay: the rotation fails, the secret kept
], ids=["timeout-above-the-delay", "timeout-below-the-delay"])
def test_verification_polls_sts_while_the_new_key_propagates(
    make: Any, pool: dict[str, User], iam: dict[str, Any], timeout_s: float, refusals: int, status: str,
    slept: list[float],
) -> None:
    user, [(old, _)] = pool["slow" if status == "succeeded" else "too-slow"]
    proxy = QueryFaultProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url, verify_timeout_s=timeout_s)
        proxy.fail("GetCallerIdentity", "InvalidClientTokenId", status=403, times=refusals)
        proxy.seen.clear()
        rig.clock.shift = DUE
        result = rig.rotate(old)
        assert result.status == status, result.reason
        assert rig.fake.slept == slept
        assert proxy.seen["GetCallerIdentity"] == len(slept) + 1
        proxy.faults.clear()
        holds_successor(rig, user, the_other(rig.iam, user, old))  # stored either way: never dropped
    if status == "failed":
        assert "the new secret does not authenticate" in result.reason
        assert [e.error for e in rig.named("rotation.failed")] == ["the new secret does not authenticate"]


# --- 7. exempt users, and audit mode ------------------------------------------------------------------
def test_an_exempt_user_is_not_rotated_without_include_out_of_scope(make: Any, pool: dict[str, User]) -> None:
    rig = make()
    user, [(key_id, _)] = pool["exempt"]
    rig.clock.shift = DUE
    for force in (False, True):
        refused = rig.rotate(key_id, force=force)
        assert refused.status == "failed" and f"exempt: {EXEMPT}" in refused.reason, refused.reason
        assert statuses(rig.iam, user) == {key_id: "Active"}
    assert stored_document(rig.sinks[0], rig.key(key_id)) is None
    opted_in = rig.rotate(key_id, force=True, include_out_of_scope=True)  # the only way: a person's choice
    assert opted_in.status == "succeeded", opted_in.reason
    assert len(statuses(rig.iam, user)) == 2


def test_audit_mode_reports_iam_keys_and_changes_nothing(
    make: Any, iam: dict[str, Any], tmp_path: Path, env: pytest.MonkeyPatch,
) -> None:
    """The scan task in audit mode (`due_with_places(..., retire_at=None)`) and `rotator scan
    --json`: due keys are reported, retiring ones left alone, and nothing is written to IAM."""
    users = ("payments", "reports", "legacy", "loose", "idle")
    before = {u: statuses(iam, iam[u]) for u in users}
    proxy = QueryFaultProxy(iam["url"])
    with proxy:
        rig = make(url=proxy.url)
        rig.clock.shift = DUE
        now = rig.clock()
        rows = list(scan(rig.ks, POLICY, now, [rig.account]))
        audit = due_with_places(rows, rig.sinks, None, now)
        assert {k.key_id: conflict for k, conflict in audit} == {iam["keys"]["loose"][0]: None,
                                                                 iam["keys"]["payments"][1]: None}
        enforce = due_with_places(rows, rig.sinks, rig.engine.retire_at, now)  # contrast: the retiring key too
        assert {k.key_id for k, _ in enforce} == {k.key_id for k, _ in audit} | {iam["keys"]["payments"][0]}

        config = tmp_path / "rotator.toml"
        config.write_text(f'[keyservice]\nkind = "aws-iam"\nendpoint_url = "{proxy.url}"\n'
                          f'user_path_prefix = "{iam["path"]}"\n[policy]\nmode = "audit"\nstrategy = "overlap"\n'
                          '[[sinks]]\nkind = "memory"\npath = "{client_id}/{alias}"\n')
        scanned = runner.invoke(app, ["scan", "--json", "--config", str(config)])
        assert scanned.exit_code == 0, scanned.output
        states = {r["key_id"]: r["state"] for r in json.loads(scanned.stdout)}
        assert states[iam["keys"]["legacy"][0]] == "excluded"
        assert states[iam["keys"]["payments"][0]] == "retiring"
        assert not any(proxy.seen[w] for w in WRITES), proxy.seen
    assert {u: statuses(iam, iam[u]) for u in users} == before


# --- 8. no secret anywhere ------------------------------------------------------------------------------
def test_the_new_secret_is_in_no_log_event_result_or_state(
    make: Any, pool: dict[str, User], moto: dict[str, Any], state: RedisState,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """A whole rotation at DEBUG (create, store in both sinks, verify, deactivate, delete)."""
    logs.configure("DEBUG", json_lines=True)
    try:
        caplog.set_level(logging.DEBUG)
        rig = make(sinks=[memory_sink(), aws_sink(moto["url"])])
        user, [(old, _)] = pool["svc8"]
        for shift in (DUE, DUE + AFTER_GRACE, DUE + AFTER_DELETE):
            rig.clock.shift = shift
            assert rig.rotate(old).ok
        new = the_other(rig.iam, user, old)
        assert statuses(rig.iam, user) == {new: "Active"}
        secret = holds_successor(rig, user, new)
        metadata = json.dumps(rig.sinks[1].metadata(rig.key(new)), default=str)
        redis_dump = redis_text(state.client, f"{state.ns}:*")
        out, err = capfd.readouterr()
        blob = "\n".join([caplog.text, out, err, metadata, redis_dump, json.dumps(state.history(100)),
                          json.dumps([r.to_dict() for r in rig.results]),
                          json.dumps([e.to_dict() for e in rig.events.events])])
        assert "rotation.finished" in blob and new in blob and len(redis_dump) > 0
        assert secret not in blob
        assert secret in json.dumps(stored_document(rig.sinks[0], rig.key(new)))  # the search can find it
    finally:
        logs.configure("WARNING")

