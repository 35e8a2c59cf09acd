"""AWS Secrets Manager, with boto3.

A secret per key, created on first use (with a KMS key, tags and a description), then a new
version per rotation with `ClientRequestToken` derived from the attempt id, so a retried write is
a no-op. AWS moves AWSCURRENT to the new version and AWSPREVIOUS to the old one; reads always
name AWSCURRENT. Tags carry the attempt id and fingerprint, never the secret.

Before the key is reset, `prepare` proves every permission the write, the read-back and the tags
need with calls that change nothing an application reads of a key's secret (see `_preflight`);
`check-config --ping` does the same on a probe secret of its own.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import boto3
import botocore.exceptions as bx
from botocore.config import Config as BotoConfig
from pydantic import Field, HttpUrl, field_validator

from rotator.domain import ApiKey, KeyRef, Secret, utc_iso
from rotator.errors import (
    ForbiddenError,
    NotFoundError,
    PermanentError,
    RotatorError,
    TransientError,
    WriteConflictError,
)
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, StoredState
from rotator.sinks.base import (
    SinkSettings,
    check_template,
    encode,
    literal_prefix,
    ref_of_document,
    refuse_if_stale,
    render,
    secret_from_document,
    state_from_document,
)

TRANSIENT_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "InternalServiceError", "InternalFailure", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeoutException",
})
DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
                          "InvalidSignatureException", "ExpiredTokenException"})
KMS_CODES = frozenset({"EncryptionFailure", "DecryptionFailure", "KMSAccessDeniedException",
                       "KMSDisabledException", "KMSInvalidStateException", "KMSNotFoundException"})


PREFLIGHT_STAGE = "ROTATOR_PREFLIGHT"  # the label of prepare's marker version: no application reads it
PROBE_NAME = "rotator-preflight"  # `check-config --ping`'s probe secret, after the template's literal prefix
# Any change to the marker's text changes its ClientRequestToken too (`_marker_token`): AWS refuses a
# token reused with other content. Every document with `rotator_preflight` reads as nothing stored.
MARKER = json.dumps({"rotator_preflight": "a marker of rotator's pre-flight, never a key's secret"})
MANAGED_TAG = {"Key": "rotator:managed", "Value": "true"}
POLICY_DOC = "docs/operations.md#aws-secrets-manager"


class AwsSecretsManagerSink:
    kind: ClassVar[str] = "aws"
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (
        bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError,
    )

    class Config(SinkSettings):
        region: str = Field(description="AWS region, e.g. eu-west-1.")
        profile: str | None = Field(None, description="Named profile from the shared AWS config.")
        endpoint_url: HttpUrl | None = Field(None, description="Another endpoint (a local one, a VPC endpoint).")
        name: str = Field("rotator/{client_id}/{key_id}", description="Secret name template.")
        kms_key_id: str | None = Field(None, description="KMS key for new secrets; default: aws/secretsmanager.")
        description: str = Field("API key rotated by rotator", description="Description of new secrets.")
        tags: dict[str, str] = Field({}, description="Extra tags on new secrets.")
        timeout_s: float = Field(10.0, gt=0, description="Connect and read time-out.")

        _check_name = field_validator("name")(check_template)

    def __init__(self, config: Config, fingerprint: Fingerprinter) -> None:
        self.config = config
        self._fingerprint = fingerprint
        session = boto3.session.Session(profile_name=config.profile, region_name=config.region)
        self._client: Any = session.client(
            "secretsmanager",
            endpoint_url=str(config.endpoint_url) if config.endpoint_url else None,
            config=BotoConfig(retries={"max_attempts": 2, "mode": "standard"},
                              connect_timeout=config.timeout_s, read_timeout=config.timeout_s),
        )

    def location(self, key: ApiKey) -> str:
        """Where this key's secret lives in this sink (two keys must never share one)."""
        return f"{self.describe()}:{render(self.config.name, key)}"

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"aws:{self.config.region}/{self.config.name}" + (f" [{ref}]" if ref else "")

    def prepare(self, key: ApiKey) -> _Prepared:
        """Read the current state, then prove every permission the write needs (`_preflight`):
        a missing one is named here, before the key is reset."""
        name = render(self.config.name, key)
        where = f"aws prepare {name}"
        current: StoredState | None = self._guarded(
            lambda: self._read(name, "AWSCURRENT", where, key, writing=True), where,
            "secretsmanager:GetSecretValue (and kms:Decrypt on the secret's KMS key)")
        exists = current is not None or bool(
            self._guarded(lambda: self._exists(name), where, "secretsmanager:DescribeSecret"))
        self._preflight(name, exists, current is not None, where)
        return _Prepared(name, True, current)

    def _preflight(self, name: str, exists: bool, has_value: bool, where: str) -> None:
        """Prove, with calls that change nothing an application reads of a key's secret, that
        these credentials may make every call of the write, the read-back and the annotation.

        - A new secret is created without a value, with its description, KMS key and tags
          (CreateSecret, TagResource): a reader still finds no AWSCURRENT, as before.
        - A secret with a value gets the marker version (`_put_marker`): PutSecretValue and
          GetSecretValue (and the KMS key's GenerateDataKey and Decrypt) on that very secret,
          while AWSCURRENT and AWSPREVIOUS do not move. A secret without a value would make any
          first version its AWSCURRENT, so the marker goes to the probe secret instead, under the
          same prefix (`_probe`): the same calls, on a sibling.
        - The `rotator:managed` tag (TagResource, which the annotation needs); the same each time."""
        if not exists:
            self._create_empty(name, where)
        if has_value:
            self._put_marker(name, where)
        else:
            self._probe(where)
        self._guarded(lambda: self._client.tag_resource(SecretId=name, Tags=[MANAGED_TAG]), where,
                      "secretsmanager:TagResource")

    def _create_empty(self, name: str, where: str) -> bool:
        """CreateSecret without a value (description, KMS key, tags); False when it exists already
        (which AWS says only once IAM allowed the call)."""
        tagged = " and secretsmanager:TagResource (for its tags)" if self.config.tags else ""
        try:
            self._client.create_secret(**self._create_args(name))
            return True
        except bx.ClientError as exc:
            if _code(exc) == "ResourceExistsException":
                return False
            raise _mapped(exc, where, f"secretsmanager:CreateSecret{tagged}") from None
        except self.transient_errors as exc:
            raise TransientError(f"{where}: {type(exc).__name__}") from None

    def _put_marker(self, name: str, where: str) -> None:
        """The marker version, labelled only `ROTATOR_PREFLIGHT` on a secret that has a value, and
        read back by that label. Its text and `ClientRequestToken` are the same every time, so a
        later put is a no-op AWS still authorizes (no new version; the KMS key's GenerateDataKey is
        proved by the first)."""
        for token in (_marker_token(name), f"rotator-preflight-{uuid.uuid4().hex}"):
            self._guarded(lambda t=token: self._client.put_secret_value(
                SecretId=name, SecretString=MARKER, ClientRequestToken=t, VersionStages=[PREFLIGHT_STAGE]), where,
                "secretsmanager:PutSecretValue (and kms:GenerateDataKey on the secret's KMS key)")
            try:
                self._guarded(lambda: self._client.get_secret_value(SecretId=name, VersionStage=PREFLIGHT_STAGE),
                              where, "secretsmanager:GetSecretValue (and kms:Decrypt on the secret's KMS key)")
                return
            except NotFoundError:
                continue  # the label left the marker when AWSCURRENT moved off it (moto drops it): a fresh one
        raise NotFoundError(f"{where}: the marker put under {PREFLIGHT_STAGE} does not read back")

    def _probe(self, where: str) -> str:
        """The probe secret `<prefix>rotator-preflight` (never a key's; asked to be created each
        time, so CreateSecret is proved too) and the marker put to it, which on its first put is its
        AWSCURRENT as well: the write's calls, on a sibling of the key's secret under the same
        prefix. Its name."""
        name = literal_prefix(self.config.name) + PROBE_NAME
        probe = f"{where} (on {name})"
        self._create_empty(name, probe)
        self._put_marker(name, probe)
        return name

    def _create_args(self, name: str) -> dict[str, Any]:
        """CreateSecret's arguments other than the value: description, KMS key, tags."""
        args: dict[str, Any] = {"Name": name, "Description": self.config.description,
                                "Tags": [{"Key": k, "Value": v} for k, v in self.config.tags.items()]}
        if self.config.kms_key_id:
            args["KmsKeyId"] = self.config.kms_key_id
        return args

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        """One call: `PutSecretValue`, or `CreateSecret` for a new one; the token makes a retry a no-op."""
        name = render(self.config.name, record.key)
        where = f"aws write {name}"
        token = client_request_token(record.attempt_id)
        try:
            if isinstance(prepared, _Prepared) and prepared.name == name and not prepared.used:
                prepared.used = True
                current, exists = prepared.current, prepared.exists
            else:
                current = self._read(name, "AWSCURRENT", where, record.key, writing=True)
                exists = current is not None or self._exists(name)
            if refuse_if_stale(current, record, where):
                assert current is not None
                return current
            if not exists:
                args = self._create_args(name)
                args.update(SecretString=encode(record), ClientRequestToken=token, Tags=[*args["Tags"], *_tags(record)])
                answer = self._client.create_secret(**args)
            else:
                answer = self._client.put_secret_value(SecretId=name, SecretString=encode(record),
                                                       ClientRequestToken=token)
        except bx.ClientError as exc:
            if _code(exc) == "ResourceExistsException":
                raise WriteConflictError(f"{where}: created by someone else meanwhile") from None
            raise _mapped(exc, where) from None
        except self.transient_errors as exc:
            raise TransientError(f"{where}: {type(exc).__name__}") from None
        return StoredState(record.fingerprint, record.attempt_id, utc_iso(record.rotated_at),
                           record.key_reset_at, answer.get("VersionId"), record.key.key_id)

    def annotate(self, record: SecretRecord) -> None:
        """Tags with the attempt and fingerprint, after the secret is safe."""
        name = render(self.config.name, record.key)
        self._guarded(lambda: self._client.tag_resource(SecretId=name, Tags=_tags(record)), f"aws tag {name}")

    def stored_refs(self) -> Iterator[tuple[str, KeyRef]]:
        """Every key this sink holds a document for, with where: `reconcile` reports the ones the
        key service no longer knows (orphans: dead secrets left behind)."""
        prefix = literal_prefix(self.config.name)
        filters = [{"Key": "name", "Values": [prefix]}] if prefix else []
        pages = self._guarded(lambda: list(self._client.get_paginator("list_secrets").paginate(Filters=filters)),
                              f"aws list {prefix}*")
        for page in pages:
            for entry in page.get("SecretList", []):
                name = entry.get("Name", "")
                try:
                    value = self._guarded(lambda n=name: self._client.get_secret_value(SecretId=n),
                                          f"aws read {name}")
                    ref = ref_of_document(json.loads(value.get("SecretString") or "null"))
                except (NotFoundError, ForbiddenError, ValueError):
                    continue  # gone meanwhile, not ours to read, or not a rotator document
                if ref is not None:
                    yield f"aws:{self.config.region}/{name}", ref

    def read_state(self, key: ApiKey) -> StoredState | None:
        return self._read_stage(key, "AWSCURRENT")

    def read_previous(self, key: ApiKey) -> StoredState | None:
        return self._read_stage(key, "AWSPREVIOUS")

    def _read_stage(self, key: ApiKey, stage: str) -> StoredState | None:
        name = render(self.config.name, key)
        state: StoredState | None = self._guarded(lambda: self._read(name, stage, f"aws read {name}", key),
                                                  f"aws read {name}")
        return state

    def read_secret(self, key: ApiKey) -> Secret | None:
        name = render(self.config.name, key)
        where = f"aws read {name}"
        loaded = self._guarded(lambda: self._document(name, "AWSCURRENT", where), where)
        return None if loaded is None else secret_from_document(loaded[0], where, key)

    def read_document(self, key: ApiKey, stage: str = "AWSCURRENT") -> dict[str, Any]:
        """The stored JSON (for tests and operators; it holds the secret)."""
        name = render(self.config.name, key)
        answer = self._client.get_secret_value(SecretId=name, VersionStage=stage)
        data: dict[str, Any] = json.loads(answer["SecretString"])
        return data

    def metadata(self, key: ApiKey) -> dict[str, Any]:
        name = render(self.config.name, key)
        described: dict[str, Any] = self._guarded(lambda: self._client.describe_secret(SecretId=name),
                                                  f"aws describe {name}")
        return described

    def ping(self) -> None:
        """ListSecrets (for `reconcile`), then every call a rotation makes, on the probe secret
        (`<prefix>rotator-preflight`, created by the first ping or pre-flight, holding only the
        marker): CreateSecret is asked for it even when it exists (AWS answers "exists" only once
        IAM allowed the call), so a missing permission is named before any reset."""
        self._guarded(lambda: self._client.list_secrets(MaxResults=1), "aws list_secrets", "secretsmanager:ListSecrets")
        where = "aws ping"
        name = self._probe(where)
        self._guarded(lambda: self._exists(name), where, "secretsmanager:DescribeSecret")
        self._guarded(lambda: self._client.tag_resource(SecretId=name, Tags=[MANAGED_TAG]), where,
                      "secretsmanager:TagResource")

    def close(self) -> None:
        self._client.close()

    def _read(self, name: str, stage: str, where: str, key: ApiKey, *, writing: bool = False) -> StoredState | None:
        loaded = self._document(name, stage, where)
        if loaded is None:
            return None
        return state_from_document(loaded[0], self._fingerprint, where, version=loaded[1], key=key, writing=writing)

    def _raw(self, name: str, stage: str) -> dict[str, Any] | None:
        """GetSecretValue at `stage`; None when there is no such secret or version."""
        try:
            answer: dict[str, Any] = self._client.get_secret_value(SecretId=name, VersionStage=stage)
        except bx.ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise
        return answer

    def _document(self, name: str, stage: str, where: str) -> tuple[Any, str | None] | None:
        """The stored document at `stage` and its version id; None when there is no such secret."""
        answer = self._raw(name, stage)
        if answer is None or _is_marker(answer.get("SecretString")):  # the pre-flight's marker: nothing stored
            return None
        try:
            return json.loads(answer["SecretString"]), answer.get("VersionId")
        except (KeyError, ValueError):
            raise PermanentError(f"{where}: the stored value is not JSON") from None

    def _exists(self, name: str) -> bool:
        try:
            self._client.describe_secret(SecretId=name)
        except bx.ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return False
            raise
        return True

    def _guarded(self, call: Any, where: str, needs: str | None = None) -> Any:
        try:
            return call()
        except bx.ClientError as exc:
            raise _mapped(exc, where, needs) from None
        except self.transient_errors as exc:
            raise TransientError(f"{where}: {type(exc).__name__}") from None


@dataclass
class _Prepared:
    name: str
    exists: bool
    current: StoredState | None
    used: bool = False


def _tags(record: SecretRecord) -> list[dict[str, str]]:
    return [
        {"Key": "rotator:attempt_id", "Value": record.attempt_id},
        {"Key": "rotator:fingerprint", "Value": record.fingerprint},
        {"Key": "rotator:key_reset_at", "Value": str(record.key_reset_at)},
        {"Key": "rotator:rotated_at", "Value": utc_iso(record.rotated_at)},
    ]


def _is_marker(text: Any) -> bool:
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return False
    return isinstance(doc, dict) and set(doc) == {"rotator_preflight"}


def _marker_token(name: str) -> str:
    """The marker's `ClientRequestToken`, the same for every put to one secret (32-64 characters)."""
    return "rotator-preflight-" + hashlib.sha256(f"{name}\n{MARKER}".encode()).hexdigest()[:32]


def client_request_token(attempt_id: str) -> str:
    """A deterministic idempotency token (32-64 characters) for one attempt."""
    token = f"rotator-{attempt_id}"
    return token if len(token) >= 32 else token.ljust(32, "0")


def _code(exc: bx.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _mapped(exc: bx.ClientError, where: str, needs: str | None = None) -> RotatorError:
    code = _code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
        return TransientError(f"{where}: {code or status}")
    if code in KMS_CODES:
        needed = f" (the call needs {needs})" if needs else ""
        return PermanentError(f"{where}: KMS refused ({code}); check kms_key_id and the key policy{needed}")
    if code in DENIED_CODES or status == 403:  # a 403 without the service's code: a VPC endpoint's policy, say
        wanted = f"the credentials need {needs}" if needs else "see the IAM policy"
        return ForbiddenError(f"{where}: access denied ({code if code in DENIED_CODES else 403}); {wanted} "
                              f"({POLICY_DOC})")
    if code == "ResourceNotFoundException":
        return NotFoundError(f"{where}: not found")
    if code == "InvalidRequestException" and "deletion" in str(exc.response.get("Error", {}).get("Message", "")):
        return PermanentError(f"{where}: the secret is scheduled for deletion; restore it (`aws secretsmanager "
                              "restore-secret`) or delete it for good (`--force-delete-without-recovery`)")
    return PermanentError(f"{where}: {code or status}")
