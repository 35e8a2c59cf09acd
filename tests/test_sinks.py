"""One contract for every sink, over real HTTP where the sink has a server; then each sink's faults."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from moto.server import ThreadedMotoServer

from rotator import logs
from rotator.domain import ApiKey, Environment, Secret
from rotator.embedded import free_port
from rotator.errors import (
    ForbiddenError,
    PermanentError,
    RotatorError,
    StaleWriteError,
    TransientError,
    WriteConflictError,
)
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, SecretSink
from rotator.sinks import registry
from rotator.sinks.aws import PREFLIGHT_STAGE
from tests.aws_helpers import FaultProxy
from tests.conftest import FP_KEY
from tests.vault_server import VaultTestServer

FP = Fingerprinter(FP_KEY)


@dataclass
class Harness:
    """A sink plus what the contract needs to look inside it."""

    sink: SecretSink
    current_doc: Callable[[ApiKey], dict[str, Any]]
    previous_doc: Callable[[ApiKey], dict[str, Any] | None]
    version_count: Callable[[ApiKey], int]
    metadata: Callable[[ApiKey], Any]


def make_key(reset_at: int = 1_750_000_000, alias: str = "Auto-generated key") -> ApiKey:
    return ApiKey(f"client-{uuid.uuid4().hex[:8]}", f"key_{uuid.uuid4().hex[:8]}", alias,
                  Environment.PRODUCTION, (), 1_700_000_000, reset_at, True)


def make_record(key: ApiKey, secret: str | None = None, attempt: str | None = None) -> SecretRecord:
    value = Secret(secret or f"prod_{uuid.uuid4().hex}{uuid.uuid4().hex}")
    return SecretRecord(key, value, attempt or str(uuid.uuid4()), FP(value), time.time())


# --- fixtures: one harness per sink kind --------------------------------------------------

@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def vault() -> Iterator[VaultTestServer]:
    with VaultTestServer() as server:
        yield server


@pytest.fixture
def aws_proxy(moto_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_url) as proxy:
        yield proxy


def vault_harness(url: str, token: str, monkeypatch: pytest.MonkeyPatch,
                  path: str = "rotator-test/{client_id}/{alias}") -> Harness:
    monkeypatch.setenv("VAULT_TOKEN", token)
    return vault_harness_of(registry.build("vault", {"url": url, "path": path}, FP))


def vault_harness_of(sink: Any) -> Harness:
    def previous(key: ApiKey) -> dict[str, Any] | None:
        meta = sink.metadata(key)
        return sink.read_version(key, meta["current_version"] - 1) if meta["current_version"] > 1 else None

    return Harness(sink, lambda k: sink.read_version(k, sink.metadata(k)["current_version"]), previous,
                   lambda k: int(sink.metadata(k)["current_version"]), lambda k: sink.metadata(k)["custom_metadata"])


def aws_harness(url: str, name: str = "rotator-test/{client_id}/{key_id}") -> Harness:
    sink: Any = registry.build("aws", {"region": "eu-west-1", "endpoint_url": url, "name": name,
                                       "tags": {"team": "payments"}}, FP)

    def previous(key: ApiKey) -> dict[str, Any] | None:
        return sink.read_document(key, "AWSPREVIOUS") if sink.read_previous(key) else None

    return Harness(sink, sink.read_document, previous,
                   lambda k: len([v for v, stages in sink.metadata(k)["VersionIdsToStages"].items()
                                  if set(stages) - {PREFLIGHT_STAGE}]),  # the pre-flight's marker is no version of it
                   lambda k: sink.metadata(k)["Tags"])


def file_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str = "{client_id}/{key_id}.secret") -> Harness:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("ROTATOR_FILE_KEY", key)
    sink: Any = registry.build("file", {"dir": str(tmp_path / "secrets"), "path": path}, FP)
    fernet = Fernet(key.encode())

    def doc(path: Path) -> dict[str, Any] | None:
        return json.loads(fernet.decrypt(path.read_bytes())) if path.exists() else None

    def current(k: ApiKey) -> dict[str, Any]:
        found = doc(sink._file(k))
        assert found is not None
        return found

    return Harness(sink, current, lambda k: doc(sink._file(k).with_name(sink._file(k).name + ".prev")),
                   lambda k: 1 + sink._file(k).with_name(sink._file(k).name + ".prev").exists(),
                   lambda k: {p.name: p.stat().st_mode & 0o777 for p in sink._file(k).parent.iterdir()})


def memory_harness(path: str | None = None) -> Harness:
    sink: Any = registry.build("memory", {"path": path} if path else {}, FP)

    def previous(k: ApiKey) -> dict[str, Any] | None:
        versions = sink.versions(k)
        return versions[-2] if len(versions) > 1 else None

    return Harness(sink, lambda k: sink.versions(k)[-1], previous, lambda k: len(sink.versions(k)),
                   lambda k: None)


KINDS = ["memory", "file", "vault", "aws", "openbao"]


def build_harness(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  by_alias: bool) -> Harness:
    """The harness of `request.param`; `by_alias`: every path is `{client_id}/{alias}`, the overlap
    strategy's layout (a key and its successor share one place)."""
    kind = request.param
    if kind == "memory":
        return memory_harness("{client_id}/{alias}" if by_alias else None)
    if kind == "file":
        return file_harness(tmp_path, monkeypatch, *(["{client_id}/{alias}.secret"] if by_alias else []))
    if kind == "vault":
        server = request.getfixturevalue("vault")
        return vault_harness(server.url, server.root_token, monkeypatch)
    if kind == "aws":
        return aws_harness(request.getfixturevalue("moto_url"), *(["rotator-test/{client_id}/{alias}"] if by_alias else []))
    # A real Vault API: the private OpenBao, AppRole under the doc's policy, a mount of this test's own.
    settings = dict(request.getfixturevalue("bao_sink"))
    settings["path"] = "rotator/{client_id}/{alias}" if by_alias else settings["path"]
    return vault_harness_of(registry.build("vault", settings, FP))


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = build_harness(request, tmp_path, monkeypatch, by_alias=False)
    yield h
    h.sink.close()


@pytest.fixture(params=KINDS)
def alias_harness(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = build_harness(request, tmp_path, monkeypatch, by_alias=True)
    yield h
    h.sink.close()


# --- the contract -------------------------------------------------------------------------

def test_stored_refs_lists_every_key_written_and_where(harness: Harness) -> None:
    """What `reconcile` reports orphans from: every stored key, once, with its place (a second
    version of one key does not list it twice; the `.prev` of the file sink is not an entry)."""
    keys = [make_key(), make_key()]
    for k in keys:
        harness.sink.write(make_record(k))
    harness.sink.write(make_record(replace(keys[0], last_reset_at=1_760_000_000)))
    listed = [(where, ref) for where, ref in harness.sink.stored_refs() if ref in {k.ref for k in keys}]
    assert sorted(str(ref) for _, ref in listed) == sorted(str(k.ref) for k in keys)
    for where, ref in listed:
        assert ref.client_id in where


def test_write_then_read_back_fingerprint(harness: Harness) -> None:
    """What was written reads back with the same fingerprint, attempt and reset date."""
    key = make_key()
    record = make_record(key)
    harness.sink.write(record)
    state = harness.sink.read_state(key)
    assert state is not None
    assert (state.fingerprint, state.attempt_id, state.key_reset_at) == (
        record.fingerprint, record.attempt_id, key.born_at)


def test_stored_document_has_the_interface_fields(harness: Harness) -> None:
    """Applications read `api_key`; the document has every field INTERFACE.md promises."""
    key = make_key()
    record = make_record(key)
    harness.sink.write(record)
    doc = harness.current_doc(key)
    assert doc["api_key"] == record.secret.reveal()
    assert {"client_id", "key_id", "alias", "environment", "api_key", "rotated_at"} <= set(doc)
    assert doc["environment"] == "PRODUCTION" and doc["rotated_at"].endswith("Z")


def test_unknown_key_reads_none(harness: Harness) -> None:
    """A key never written reads as None, not an error."""
    assert harness.sink.read_state(make_key()) is None


def test_retry_of_the_same_attempt_is_a_no_op(harness: Harness) -> None:
    """Writing the same record twice leaves one version."""
    key = make_key()
    record = make_record(key)
    harness.sink.write(record)
    before = harness.version_count(key)
    harness.sink.write(record)
    assert harness.version_count(key) == before


def test_previous_version_stays_readable(harness: Harness) -> None:
    """After a second rotation the first secret is still readable as the previous version."""
    key1 = make_key(reset_at=1_750_000_000)
    first = make_record(key1)
    harness.sink.write(first)
    key2 = ApiKey(key1.client_id, key1.key_id, key1.alias, key1.environment, (), key1.created_at, 1_760_000_000, True)
    second = make_record(key2)
    harness.sink.write(second)
    assert harness.current_doc(key2)["api_key"] == second.secret.reveal()
    previous = harness.previous_doc(key2)
    assert previous is not None and previous["api_key"] == first.secret.reveal()


def test_stale_writer_is_rejected(harness: Harness) -> None:
    """A write for an older key reset than the stored one fails and changes nothing."""
    newer_key = make_key(reset_at=1_760_000_000)
    newer = make_record(newer_key)
    harness.sink.write(newer)
    older_key = ApiKey(newer_key.client_id, newer_key.key_id, newer_key.alias, newer_key.environment, (),
                       newer_key.created_at, 1_750_000_000, True)
    with pytest.raises(StaleWriteError) as info:
        harness.sink.write(make_record(older_key))
    assert "newer rotation" in str(info.value)
    assert harness.current_doc(newer_key)["api_key"] == newer.secret.reveal()


def test_metadata_holds_no_secret(harness: Harness) -> None:
    """Metadata outside the value (custom metadata, tags, file names) never holds the secret."""
    key = make_key()
    record = make_record(key)
    harness.sink.write(record)
    meta = json.dumps(harness.metadata(key), default=str)
    assert record.secret.reveal() not in meta
    state = harness.sink.read_state(key)
    assert state is not None and record.secret.reveal() not in repr(state)


def test_sink_describes_itself_without_credentials(harness: Harness) -> None:
    """describe() names the kind and place, never a token."""
    text = harness.sink.describe(make_key().ref)
    assert text.split(":")[0] == harness.sink.kind
    assert "token" not in text.lower() or "{" in text


def test_ping_succeeds_on_a_healthy_sink(harness: Harness) -> None:
    """ping() reaches the sink and returns."""
    harness.sink.ping()


COMMON_FIELDS = {"client_id", "key_id", "alias", "base_alias", "environment", "api_key", "rotated_at", "key_reset_at",
                 "attempt_id"}


def successor(key: ApiKey) -> ApiKey:
    """The overlap strategy's successor of `key`: same client and alias, created later, `replaces` it."""
    return replace(key, key_id=f"key_{uuid.uuid4().hex[:8]}", created_at=key.born_at + 100, last_reset_at=None,
                   replaces=key.key_id)


def test_read_secret_round_trip(harness: Harness) -> None:
    """read_secret gives back the secret written (None before any write); a new rotation's replaces it."""
    key = make_key()
    assert harness.sink.read_secret(key) is None
    first = make_record(key)
    harness.sink.write(first)
    assert harness.sink.read_secret(key) == first.secret
    later = replace(key, last_reset_at=1_760_000_000)
    second = make_record(later)
    harness.sink.write(second)
    assert harness.sink.read_secret(later) == second.secret


def test_a_successor_overwrites_its_predecessors_document(alias_harness: Harness) -> None:
    """Overlap: N (N.replaces == K) is stored where K's document is. Before, the place reads as an older
    rotation of N with no secret of N; after, N's secret reads back and K's is the previous version."""
    h = alias_harness
    old = make_key()
    first = make_record(old)
    h.sink.write(first)
    new = successor(old)
    before = h.sink.read_state(new)
    assert before is not None and (before.fingerprint, before.key_id) == (first.fingerprint, old.key_id)
    assert h.sink.read_secret(new) is None
    record = make_record(new)
    written = h.sink.write(record, h.sink.prepare(new))
    assert (written.fingerprint, written.key_id) == (record.fingerprint, new.key_id)
    state = h.sink.read_state(new)
    assert state is not None and (state.fingerprint, state.key_id) == (record.fingerprint, new.key_id)
    assert h.sink.read_secret(new) == record.secret
    assert h.current_doc(new)["key_id"] == new.key_id
    previous = h.previous_doc(new)
    assert previous is not None and previous["api_key"] == first.secret.reveal()
    h.sink.write(record)  # a retry of the same attempt is a no-op
    assert h.version_count(new) == 2


def test_an_unrelated_key_at_the_same_place_is_still_refused(alias_harness: Harness) -> None:
    """Only the predecessor's document gives way: a key of the same alias that does not replace the
    stored one (or replaces another) is refused at prepare, write and both reads; the secret stays."""
    h = alias_harness
    stored = make_key()
    first = make_record(stored)
    h.sink.write(first)
    for other in (replace(successor(stored), replaces=None), replace(successor(stored), replaces="key_elsewhere")):
        calls: list[Callable[[], object]] = [lambda o=other: h.sink.prepare(o),
                                             lambda o=other: h.sink.write(make_record(o)),
                                             lambda o=other: h.sink.read_state(o),
                                             lambda o=other: h.sink.read_secret(o)]
        for call in calls:
            with pytest.raises(PermanentError, match="another key") as info:
                call()
            assert first.secret.reveal() not in str(info.value)
    assert h.current_doc(stored)["api_key"] == first.secret.reveal()


def test_the_predecessor_reads_none_once_its_successor_is_stored(alias_harness: Harness) -> None:
    """Once N is stored, the retiring K (K.replaced_by == N) reads None: nothing of K is there any
    more. K's record never overwrites N's, at prepare or at write, however late its reset."""
    h = alias_harness
    old = make_key()
    h.sink.write(make_record(old))
    new = successor(old)
    newest = make_record(new)
    h.sink.write(newest)
    retiring = replace(old, replaced_by=new.key_id)
    assert h.sink.read_state(retiring) is None
    assert h.sink.read_secret(retiring) is None
    with pytest.raises(StaleWriteError, match="successor"):
        h.sink.prepare(retiring)
    with pytest.raises(StaleWriteError, match="successor"):
        h.sink.write(make_record(replace(retiring, last_reset_at=2_000_000_000)))
    assert h.current_doc(new)["api_key"] == newest.secret.reveal()


def test_an_aws_iam_document_carries_the_access_key_pair(harness: Harness) -> None:
    """An AWS IAM key is stored so AWS tooling can read it (access_key_id, secret_access_key beside
    api_key); every other key's document keeps only the common fields."""
    iam = replace(make_key(), provider="aws-iam")
    record = make_record(iam)
    harness.sink.write(record)
    doc = harness.current_doc(iam)
    secret = record.secret.reveal()
    assert (doc["access_key_id"], doc["secret_access_key"], doc["api_key"]) == (iam.key_id, secret, secret)
    assert set(doc) == COMMON_FIELDS | {"access_key_id", "secret_access_key"}
    assert harness.sink.read_secret(iam) == record.secret
    plain = make_key()
    harness.sink.write(make_record(plain))
    assert set(harness.current_doc(plain)) == COMMON_FIELDS


# --- Vault: faults over real HTTP ---------------------------------------------------------

@pytest.fixture
def vault_sink(vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    return vault_harness(vault.url, vault.root_token, monkeypatch).sink


def test_vault_sealed_is_transient(vault: VaultTestServer, vault_sink: Any) -> None:
    """A sealed Vault (503) is a TransientError that says so."""
    vault.state.sealed = True
    with pytest.raises(TransientError, match="unavailable or sealed"):
        vault_sink.write(make_record(make_key()))


def test_vault_permission_denied_is_permanent(vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only token gets 403: a ForbiddenError, the token not in the message."""
    token = vault.state.issue_token("read")
    sink: Any = vault_harness(vault.url, token, monkeypatch).sink
    with pytest.raises(ForbiddenError) as info:
        sink.write(make_record(make_key()))
    assert token not in str(info.value)


def test_vault_bad_token_is_permanent(vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown token is refused at once."""
    sink: Any = vault_harness(vault.url, "hvs.not-a-token", monkeypatch).sink
    with pytest.raises(ForbiddenError):
        sink.ping()


def test_vault_cas_conflict_is_a_retryable_conflict(vault: VaultTestServer, vault_sink: Any) -> None:
    """A writer between our read and our write makes CAS fail: WriteConflictError (transient)."""
    key = make_key()
    vault_sink.write(make_record(key))
    kv = vault_sink._kv()
    original = kv.read_secret_version

    def sneaky_read(**kwargs: Any) -> Any:
        answer = original(**kwargs)
        kv.create_or_update_secret(path=kwargs["path"], secret={"api_key": "x"}, mount_point="secret")
        return answer

    kv.read_secret_version = sneaky_read
    with pytest.raises(WriteConflictError, match="check-and-set"):
        vault_sink.write(make_record(ApiKey(key.client_id, key.key_id, key.alias, key.environment, (),
                                            key.created_at, 1_760_000_000, True)))
    assert issubclass(WriteConflictError, TransientError)


def test_vault_metadata_is_strings_and_keeps_delete_after(vault: VaultTestServer, vault_sink: Any) -> None:
    """custom_metadata carries attempt and fingerprint as strings; delete_version_after survives."""
    key = make_key()
    record = make_record(key)
    vault_sink.write(record)
    vault_sink.annotate(record)
    kv = vault_sink._kv()
    path = f"rotator-test/{key.client_id}/auto-generated-key"
    kv.update_metadata(path=path, delete_version_after="720h", max_versions=10,
                       custom_metadata=vault_sink.metadata(key)["custom_metadata"])
    second_key = ApiKey(key.client_id, key.key_id, key.alias, key.environment, (), key.created_at, 1_760_000_000, True)
    second = make_record(second_key)
    vault_sink.write(second)
    vault_sink.annotate(second)
    meta = vault_sink.metadata(second_key)
    assert meta["delete_version_after"] == "720h"
    assert meta["max_versions"] == 10
    assert meta["custom_metadata"]["attempt_id"] == second.attempt_id
    assert meta["custom_metadata"]["fingerprint"] == second.fingerprint
    assert all(isinstance(v, str) for v in meta["custom_metadata"].values())


def test_vault_approle_login(vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """AppRole: role id and secret id from env log in and the write works."""
    vault.state.approles["role-1"] = "secret-1"
    monkeypatch.setenv("ROLE_ID", "role-1")
    monkeypatch.setenv("SECRET_ID", "secret-1")
    sink = registry.build("vault", {"url": vault.url, "auth": "approle", "role_id_env": "ROLE_ID",
                                    "secret_id_env": "SECRET_ID"}, FP)
    key = make_key()
    sink.write(make_record(key))
    assert sink.read_state(key) is not None


def test_vault_login_tokens_are_replaced_before_they_expire(vault: VaultTestServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker lives longer than its AppRole token: the sink logs in again before the lease ends
    (no write ever meets an expired token), and a token that dies early anyway (revoked) is a
    transient failure whose retry logs in afresh, not a permanent one that puts a secret at risk."""
    from rotator.errors import TransientError

    vault.state.approles["role-2"] = "secret-2"
    vault.state.token_ttl_s = 2  # Vault's lease_duration: the sink renews after three quarters of it
    monkeypatch.setenv("ROLE_ID", "role-2")
    monkeypatch.setenv("SECRET_ID", "secret-2")
    sink: Any = registry.build("vault", {"url": vault.url, "auth": "approle", "role_id_env": "ROLE_ID",
                                         "secret_id_env": "SECRET_ID"}, FP)
    try:
        key = make_key()
        sink.write(make_record(key))
        time.sleep(2.2)  # the first token has expired
        later = replace(key, last_reset_at=key.born_at + 10)
        sink.write(make_record(later))  # logged in again first
        assert sink.read_state(later) is not None
        vault.state.expires.update({t: 0.0 for t in vault.state.tokens if t != vault.root_token})  # revoked
        with pytest.raises(TransientError, match="logging in again"):
            sink.read_state(later)
        assert sink.read_state(later) is not None  # the retry logged in afresh
    finally:
        vault.state.token_ttl_s = None


def test_vault_kubernetes_login(vault: VaultTestServer, tmp_path: Path) -> None:
    """Kubernetes auth: the service-account JWT file logs in."""
    jwt = tmp_path / "token"
    jwt.write_text("eyJhbGciOi.test.jwt\n")
    vault.state.k8s_roles["rotator"] = "eyJhbGciOi.test.jwt"
    sink = registry.build("vault", {"url": vault.url, "auth": "kubernetes", "kubernetes_role": "rotator",
                                    "kubernetes_jwt_file": str(jwt)}, FP)
    sink.ping()


def test_vault_config_asks_for_the_right_credentials() -> None:
    """AppRole needs role and secret ids; token auth needs its variable set."""
    problems = registry.check("vault", {"url": "http://v:8200", "auth": "approle"}, {})
    assert {k for k, _ in problems} == {"role_id_env", "secret_id_env"}
    assert registry.check("vault", {"url": "http://v:8200"}, {}) == [
        ("token_env", "environment variable VAULT_TOKEN is not set")]
    assert registry.check("vault", {"url": "http://v:8200", "max_versions": 1}, {"VAULT_TOKEN": "x"})[0][0] == "max_versions"


# --- AWS: faults through a proxy in front of moto -----------------------------------------

def test_aws_creates_with_tags_and_kms_then_versions(aws_proxy: FaultProxy) -> None:
    """First write creates the secret with tags; the next moves AWSCURRENT and AWSPREVIOUS."""
    sink: Any = aws_harness(aws_proxy.url).sink
    key = make_key()
    record = make_record(key)
    sink.write(record)
    sink.annotate(record)
    tags = {t["Key"]: t["Value"] for t in sink.metadata(key)["Tags"]}
    assert tags["team"] == "payments" and tags["rotator:attempt_id"] == record.attempt_id
    key2 = ApiKey(key.client_id, key.key_id, key.alias, key.environment, (), key.created_at, 1_760_000_000, True)
    second = make_record(key2)
    sink.write(second)
    sink.annotate(second)
    stages = sorted(s for v in sink.metadata(key2)["VersionIdsToStages"].values() for s in v)
    assert stages == ["AWSCURRENT", "AWSPREVIOUS"]
    assert {t["Key"]: t["Value"] for t in sink.metadata(key2)["Tags"]}["rotator:fingerprint"] == second.fingerprint


def test_aws_throttling_is_transient(aws_proxy: FaultProxy) -> None:
    """ThrottlingException past botocore's own retry is a TransientError."""
    sink: Any = aws_harness(aws_proxy.url).sink
    aws_proxy.fail("GetSecretValue", "ThrottlingException", times=5)
    with pytest.raises(TransientError, match="ThrottlingException"):
        sink.write(make_record(make_key()))


def test_aws_kms_access_denied_is_permanent_and_clear(aws_proxy: FaultProxy) -> None:
    """A KMS refusal is permanent and points at kms_key_id."""
    sink: Any = aws_harness(aws_proxy.url).sink
    aws_proxy.fail("CreateSecret", "KMSAccessDeniedException")
    with pytest.raises(PermanentError, match="KMS refused.*kms_key_id"):
        sink.write(make_record(make_key()))


def test_aws_access_denied_is_forbidden(aws_proxy: FaultProxy) -> None:
    """AccessDenied names the IAM policy."""
    sink: Any = aws_harness(aws_proxy.url).sink
    aws_proxy.fail("GetSecretValue", "AccessDeniedException")
    with pytest.raises(ForbiddenError, match="IAM policy"):
        sink.write(make_record(make_key()))


def test_aws_unreachable_endpoint_is_transient() -> None:
    """Nothing listening: a TransientError."""
    sink: Any = aws_harness(f"http://127.0.0.1:{free_port()}").sink
    with pytest.raises(TransientError):
        sink.write(make_record(make_key()))


def test_aws_client_request_token_is_deterministic() -> None:
    """The token is derived from the attempt id and is 32-64 characters."""
    from rotator.sinks.aws import client_request_token

    attempt = str(uuid.uuid4())
    assert client_request_token(attempt) == client_request_token(attempt)
    assert 32 <= len(client_request_token(attempt)) <= 64


# --- file: mode, atomicity and disk faults -------------------------------------------------

def test_file_is_0600_and_encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is mode 0600 and its bytes do not contain the secret."""
    h = file_harness(tmp_path, monkeypatch)
    key = make_key()
    record = make_record(key)
    h.sink.write(record)
    path = h.sink._file(key)  # type: ignore[attr-defined]
    assert path.stat().st_mode & 0o777 == 0o600
    assert record.secret.reveal().encode() not in path.read_bytes()


def test_file_full_disk_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC (simulated at fsync) is transient, and the old file is untouched."""
    h = file_harness(tmp_path, monkeypatch)
    key = make_key()
    first = make_record(key)
    h.sink.write(first)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    key2 = ApiKey(key.client_id, key.key_id, key.alias, key.environment, (), key.created_at, 1_760_000_000, True)
    with pytest.raises(TransientError, match="No space left"):
        h.sink.write(make_record(key2))
    monkeypatch.undo()
    assert [p.name for p in h.sink._file(key).parent.iterdir() if p.name.startswith(".tmp")] == []  # type: ignore[attr-defined]


def test_file_unwritable_directory_is_permanent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory that is a file (not writable as one) is a permanent, clear error."""
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    blocker = tmp_path / "blocked"
    blocker.write_text("not a directory")
    sink = registry.build("file", {"dir": str(blocker)}, FP)
    with pytest.raises(PermanentError, match="Not a directory"):
        sink.write(make_record(make_key()))


def test_file_wrong_key_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading with another key says it cannot decrypt, without content."""
    h = file_harness(tmp_path, monkeypatch)
    key = make_key()
    h.sink.write(make_record(key))
    monkeypatch.setenv("ROTATOR_FILE_KEY", Fernet.generate_key().decode())
    other = registry.build("file", {"dir": str(tmp_path / "secrets")}, FP)
    with pytest.raises(RotatorError, match="cannot decrypt"):
        other.read_state(key)


def test_file_key_must_be_fernet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key that is not a Fernet key is refused when the sink is built."""
    monkeypatch.setenv("ROTATOR_FILE_KEY", "too-short")
    with pytest.raises(PermanentError, match="not a Fernet key"):
        registry.build("file", {"dir": str(tmp_path)}, FP)


# --- registry and secrecy ------------------------------------------------------------------

def test_registry_suggests_a_kind_on_typo() -> None:
    """An unknown kind lists the known ones and suggests the closest."""
    with pytest.raises(PermanentError, match="did you mean 'vault'"):
        registry.resolve("vualt")
    assert set(registry.kinds()) >= {"vault", "aws", "file", "memory"}


def test_registry_loads_third_party_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `rotator.sinks` entry point becomes a kind."""
    from importlib.metadata import EntryPoint

    ep = EntryPoint("thirdparty", "rotator.sinks.memory:MemorySink", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    registry.kinds.cache_clear()
    try:
        assert registry.resolve("thirdparty").kind == "memory"
    finally:
        registry.kinds.cache_clear()


def test_no_secret_in_exceptions_or_logs(
    vault: VaultTestServer, aws_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """Writing a known secret through every sink, with faults, at DEBUG: it is in no log or error."""
    logs.configure("DEBUG", json_lines=True)
    caplog.set_level(logging.DEBUG)
    secret = "prod_CANARY_" + uuid.uuid4().hex
    texts: list[str] = []
    harnesses = [vault_harness(vault.url, vault.root_token, monkeypatch), aws_harness(aws_proxy.url),
                 file_harness(tmp_path, monkeypatch), memory_harness()]
    for h in harnesses:
        key = make_key()
        h.sink.write(make_record(key, secret))
        for fault in ("stale", "broken"):
            try:
                if fault == "stale":
                    older = ApiKey(key.client_id, key.key_id, key.alias, key.environment, (), key.created_at, 1, True)
                    h.sink.write(make_record(older, secret + "x"))
                else:
                    vault.state.sealed = True
                    aws_proxy.fail("*", "InternalServiceError", status=500, times=3)
                    h.sink.write(make_record(make_key(reset_at=2_000_000_000), secret))
            except RotatorError as exc:
                texts += [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
            finally:
                vault.state.sealed = False
                aws_proxy.faults.clear()
    out, err = capfd.readouterr()
    everything = "\n".join([*texts, caplog.text, out, err])
    assert len(texts) >= 6
    assert secret not in everything
    logs.configure("WARNING")


def test_an_unreachable_vault_is_named_with_the_step_that_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`check-config --ping` with AppRole and no Vault listening: the AppRole login is what failed,
    and the message says Vault could not be reached and where (not `token lookup: ConnectionError`)."""
    from rotator.embedded import free_port
    from rotator.errors import TransientError

    monkeypatch.setenv("ROLE_ID", "role-1")
    monkeypatch.setenv("SECRET_ID", "secret-1")
    url = f"http://127.0.0.1:{free_port()}"
    sink = registry.build("vault", {"url": url, "auth": "approle", "role_id_env": "ROLE_ID",
                                    "secret_id_env": "SECRET_ID"}, FP)
    with pytest.raises(TransientError) as info:
        sink.ping()
    assert str(info.value) == f"vault login (approle): cannot reach Vault at {url}/ (ConnectionError)"
