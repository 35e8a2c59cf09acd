"""HashiCorp Vault or OpenBao (the same HTTP API), KV v2, with hvac.

Writes use check-and-set on the version read just before, so a writer that lost a race fails
instead of overwriting. The attempt id, fingerprint, key reset date and rotation time go into the
secret's `custom_metadata` (strings only); the secret goes only into the versioned data.
`max_versions` >= 2 keeps the previous secret readable while applications switch over.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions as hx
import requests
from pydantic import Field, HttpUrl, field_validator

from rotator.config import read_credential
from rotator.domain import ApiKey, KeyRef, Secret, utc_iso
from rotator.errors import (
    AuthenticationError,
    ForbiddenError,
    NotFoundError,
    PermanentError,
    RotatorError,
    TransientError,
    WriteConflictError,
)
from rotator.fingerprint import Fingerprinter
from rotator.protocols import SecretRecord, StoredState
from rotator.safety import redact_url, shown_path
from rotator.sinks.base import (
    SinkSettings,
    check_template,
    document,
    literal_prefix,
    ref_of_document,
    refuse_if_stale,
    render,
    sample_path,
    secret_from_document,
    state_from_document,
)

K8S_JWT = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
POLICY_DOC = "docs/operations.md#vault-approle-and-the-least-privilege-policy"
# What each step needs (KV v2 as Vault and OpenBao enforce it): the data path is written with
# `create` while Vault has never seen it (no metadata) and with `update` once it has (a secret, or
# metadata put first), read back with `read`; the metadata is read before the write (`read`) and
# annotated after it, when it exists (`update`).
DATA_CAPS = ("create", "update", "read")
# The secret's `custom_metadata` (strings; never the secret): set after the write, with max_versions.
CUSTOM_METADATA = ("attempt_id", "fingerprint", "key_reset_at", "rotated_at")
METADATA_CAPS = ("read", "update", "list")


def vault_policy(mount: str, path_template: str) -> str:
    """The least-privilege policy for one sink (docs/operations.md shows it for any mount and path):
    `list` only serves `reconcile`'s orphan report."""
    folder = literal_prefix(path_template).rsplit("/", 1)[0] if "/" in literal_prefix(path_template) else ""
    glob = f"{folder}/*" if folder else "*"

    def caps(names: tuple[str, ...]) -> str:
        return ", ".join(f'"{n}"' for n in names)

    return (f'path "{mount}/data/{glob}" {{ capabilities = [{caps(DATA_CAPS)}] }}\n'
            f'path "{mount}/metadata/{glob}" {{ capabilities = [{caps(METADATA_CAPS)}] }}\n')


_T = TypeVar("_T")


@dataclass
class _Prepared:
    """What `prepare` read for one path: the CAS version the write after the reset builds on."""

    path: str
    version: int
    current: StoredState | None
    known: bool = False  # the path has metadata: Vault writes it with `update`
    used: bool = False


class SameOriginSession(requests.Session):
    """Follows a redirect only within Vault's own origin. requests strips `Authorization` on a
    redirect to another host but keeps `X-Vault-Token`, and a 307/308 resends the body: a write
    redirected elsewhere would hand over the token and the secret. Refused before anything is sent."""

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        if _origin(prepared_request.url) != _origin(response.request.url):
            there = _origin(prepared_request.url)
            raise PermanentError(
                f"Vault answered {response.status_code} redirecting to another origin ({there[0]}://{there[1]}:"
                f"{there[2]}); rotator does not send its token or a secret there: point the sink's url at the "
                "active node or at a load balancer in front of the cluster")
        super().rebuild_auth(prepared_request, response)


def _origin(url: str | bytes | None) -> tuple[str, str, int]:
    parts = urlsplit(url.decode() if isinstance(url, bytes) else str(url or ""))
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class VaultSink:
    kind: ClassVar[str] = "vault"
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (
        hx.VaultDown, hx.InternalServerError, hx.BadGateway, hx.RateLimitExceeded,
        requests.ConnectionError, requests.Timeout,
    )

    class Config(SinkSettings):
        url: HttpUrl = Field(description="Vault address.")
        mount: str = Field("secret", description="KV v2 mount point.")
        path: str = Field("rotator/{client_id}/{key_id}", description="Secret path template.")
        auth: Literal["token", "approle", "kubernetes"] = Field("token", description="Login method.")
        token_env: str | None = Field("VAULT_TOKEN", description="Variable with the token (token auth).")
        token_file: Path | None = Field(None, description="File with the token (token auth).")
        role_id_env: str | None = Field(None, description="AppRole: variable with the role id.")
        role_id_file: Path | None = Field(None, description="AppRole: file with the role id.")
        secret_id_env: str | None = Field(None, description="AppRole: variable with the secret id.")
        secret_id_file: Path | None = Field(None, description="AppRole: file with the secret id.")
        approle_mount: str = Field("approle", description="AppRole auth mount.")
        kubernetes_role: str | None = Field(None, description="Kubernetes auth role.")
        kubernetes_jwt_file: Path = Field(K8S_JWT, description="Service-account token file.")
        kubernetes_mount: str = Field("kubernetes", description="Kubernetes auth mount.")
        namespace: str | None = Field(None, description="Vault Enterprise namespace.")
        ca_bundle: Path | None = Field(None, description="CA bundle to verify Vault's certificate.")
        max_versions: int = Field(10, ge=2, description="Versions kept; >= 2 keeps the previous secret.")
        timeout_s: float = Field(10.0, gt=0, description="Per-request time-out.")

        _check_path = field_validator("path")(check_template)

        def credential_problems(self, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
            needed = {"token": ("token_env",), "approle": ("role_id_env", "secret_id_env"),
                      "kubernetes": ()}[self.auth]
            for name in needed:
                twin = getattr(self, name[:-4] + "_file")
                value = getattr(self, name)
                if twin is None and not value:
                    yield name, f"auth = {self.auth!r} needs {name} or {name[:-4]}_file"
            for name, reason in super().credential_problems(env):
                if name in needed or name.replace("_file", "_env") in needed:
                    yield name, reason
            if self.auth == "kubernetes":
                if not self.kubernetes_role:
                    yield "kubernetes_role", "auth = 'kubernetes' needs kubernetes_role"
                if not self.kubernetes_jwt_file.is_file():
                    yield "kubernetes_jwt_file", f"{shown_path(self.kubernetes_jwt_file)} does not exist"

    def __init__(self, config: Config, fingerprint: Fingerprinter) -> None:
        self.config = config
        self._fingerprint = fingerprint
        self._client: hvac.Client | None = None
        self._login_ends = float("inf")  # monotonic time after which the login token may have expired
        self._needs: str | None = None  # the capability the call under way needs, for a 403's message
        self.logins = 0  # logins so far: a 403 under a login made during the same call is a refusal

    # --- SecretSink ------------------------------------------------------------------------
    def location(self, key: ApiKey) -> str:
        """Where this key's secret lives in this sink (two keys must never share one)."""
        return f"{self.describe()}:{render(self.config.path, key)}"

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"vault:{self.config.mount}/{self.config.path}" + (f" [{ref}]" if ref else "")

    def prepare(self, key: ApiKey) -> _Prepared:
        """Log in; check the token holds every capability the write, the read-back and the metadata
        need for this path as it stands (a path with metadata is written with `update`, one Vault
        has never seen with `create`); read its current version and state. Whatever is missing is
        found here, before the key is reset."""
        path = render(self.config.path, key)
        where = f"vault prepare {self.config.mount}/{path}"
        with self._errors(where):
            caps = self._capabilities(path, where)
            self._require(caps, path, where, metadata=("read",))
            meta = self._metadata(path)
            version = int(meta["current_version"]) if meta else 0
            # Vault writes a path whose metadata exists (even with no version yet, as after
            # `kv metadata put`) with `update`, and only a path it has never seen with `create`.
            self._require(caps, path, where, data=("update" if meta else "create", "read"), metadata=("update",))
            current = self._read(path, version, where, key, writing=True) if version else None
        return _Prepared(path, version, current, meta is not None)

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        """One CAS write on the version `prepare` read; a lost race or a retry reads afresh."""
        path = render(self.config.path, record.key)
        where = f"vault write {self.config.mount}/{path}"
        with self._errors(where):
            if isinstance(prepared, _Prepared) and prepared.path == path and not prepared.used:
                prepared.used = True
                version, current, known = prepared.version, prepared.current, prepared.known
            else:
                meta = self._metadata(path)
                version, known = (int(meta["current_version"]) if meta else 0), meta is not None
                current = self._read(path, version, where, record.key, writing=True) if version else None
            if not refuse_if_stale(current, record, where):
                self._needs = f"'{'update' if known else 'create'}' on {self._data_path(path)}"
                answer = self._kv().create_or_update_secret(
                    path=path, secret=document(record), cas=version, mount_point=self.config.mount
                )
                version = int(answer["data"]["version"])
            return StoredState(record.fingerprint, record.attempt_id, utc_iso(record.rotated_at),
                               record.key_reset_at, str(version), record.key.key_id)

    def annotate(self, record: SecretRecord) -> None:
        """Custom metadata (attempt, fingerprint, dates) and max_versions, after the secret is safe."""
        path = render(self.config.path, record.key)
        with self._errors(f"vault metadata {self.config.mount}/{path}"):
            meta = self._metadata(path)
            custom = dict(zip(CUSTOM_METADATA, (record.attempt_id, record.fingerprint, str(record.key_reset_at),
                                                utc_iso(record.rotated_at)), strict=True))
            wanted = self.config.max_versions
            if not meta or meta.get("custom_metadata") != custom or meta.get("max_versions") != wanted:
                # update_metadata replaces the whole map and would reset delete_version_after: keep it.
                self._kv().update_metadata(
                    path=path, max_versions=self.config.max_versions, custom_metadata=custom,
                    delete_version_after=(meta or {}).get("delete_version_after") or "0s",
                    mount_point=self.config.mount,
                )

    def stored_refs(self) -> Iterator[tuple[str, KeyRef]]:
        """Every key this sink holds a document for, with where: `reconcile` reports the ones the
        key service no longer knows (orphans: dead secrets left behind)."""
        prefix = literal_prefix(self.config.path)
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        with self._errors(f"vault list {self.config.mount}/{folder}"):
            yield from self._walk(folder)

    def _walk(self, folder: str) -> Iterator[tuple[str, KeyRef]]:
        try:
            answer = self._kv().list_secrets(path=folder, mount_point=self.config.mount)
        except hx.InvalidPath:  # nothing stored under it
            return
        for name in (answer.get("data") or {}).get("keys") or []:
            child = f"{folder}/{name}" if folder else str(name)
            if child.endswith("/"):
                yield from self._walk(child.rstrip("/"))
                continue
            try:
                data = self._kv().read_secret_version(path=child, mount_point=self.config.mount,
                                                      raise_on_deleted_version=True)["data"]["data"]
            except hx.InvalidPath:
                continue
            ref = ref_of_document(data)
            if ref is not None:
                yield f"vault:{self.config.mount}/{child}", ref

    def read_state(self, key: ApiKey) -> StoredState | None:
        return self._read_current(key, lambda path, version, where: self._read(path, version, where, key))

    def read_secret(self, key: ApiKey) -> Secret | None:
        return self._read_current(key, lambda path, version, where: secret_from_document(
            self._document(path, version), where, key))

    def _read_current(self, key: ApiKey, read: Callable[[str, int, str], _T | None]) -> _T | None:
        """`read` of the key's current version (path, version, where), or None when nothing is stored."""
        path = render(self.config.path, key)
        where = f"vault read {self.config.mount}/{path}"
        with self._errors(where):
            meta = self._metadata(path)
            if not meta or not meta.get("current_version"):
                return None
            return read(path, int(meta["current_version"]), where)

    def read_version(self, key: ApiKey, version: int) -> dict[str, Any]:
        """One stored document (for tests and operators; it holds the secret)."""
        path = render(self.config.path, key)
        with self._errors(f"vault read {self.config.mount}/{path}"):
            data: dict[str, Any] = self._document(path, version)
            return data

    def metadata(self, key: ApiKey) -> dict[str, Any] | None:
        path = render(self.config.path, key)
        with self._errors(f"vault metadata {self.config.mount}/{path}"):
            return self._metadata(path)

    def ping(self) -> None:
        """The login works and the token may do everything a rotation of any key does, at a sample
        path from the template (both `create` and `update`: every key's second rotation writes over
        its first), so a missing capability is named before any reset."""
        logins = self.logins  # a login made here makes a refusal below the policy's answer
        with self._errors("vault token lookup" if self.config.auth == "token" else f"vault login ({self.config.auth})"):
            client = self._client_or_login()
        with self._errors("vault token lookup", logins_before=logins):
            self._needs = ("a valid token (token_env or token_file) with 'read' on auth/token/lookup-self (the "
                           "`default` policy)" if self.config.auth == "token" else
                           "'read' on auth/token/lookup-self (the token's `default` policy)")
            client.auth.token.lookup_self()
        sample = sample_path(self.config.path)
        where = f"vault ping {self.config.mount}/{sample}"
        with self._errors(where):
            caps = self._capabilities(sample, where)
            self._require(caps, sample, where, data=("create", "update", "read"), metadata=("read", "update"))

    def close(self) -> None:
        if self._client is not None:
            self._client.adapter.close()
            self._client = None

    # --- internals ---------------------------------------------------------------------------
    def _data_path(self, path: str) -> str:
        return f"{self.config.mount}/data/{path}"

    def _metadata_path(self, path: str) -> str:
        return f"{self.config.mount}/metadata/{path}"

    def _capabilities(self, path: str, where: str) -> dict[str, set[str]]:
        """What the token may do on this path's data and metadata (`sys/capabilities-self`, which
        the `default` policy allows)."""
        paths = [self._data_path(path), self._metadata_path(path)]
        self._needs = "'update' on sys/capabilities-self (the token's `default` policy)"
        answer = self._client_or_login().sys.get_capabilities(paths=paths)
        self._needs = None
        data = answer.get("data") if isinstance(answer.get("data"), dict) else answer
        return {p: {str(c) for c in (data.get(p) or [])} for p in paths}

    def _require(self, caps: dict[str, set[str]], path: str, where: str, *, data: tuple[str, ...] = (),
                 metadata: tuple[str, ...] = ()) -> None:
        """Refuse, naming the first missing capability and its path, unless the token holds all."""
        for full, wanted in ((self._data_path(path), data), (self._metadata_path(path), metadata)):
            held = set() if "deny" in caps.get(full, set()) else caps.get(full, set())
            if "root" in held:
                continue
            for name in wanted:
                if name not in held:
                    raise ForbiddenError(f"{where}: the token lacks {name!r} on {full} (it holds "
                                         f"{sorted(held) or 'nothing'}); the policy it needs: {POLICY_DOC}")

    def _kv(self) -> Any:
        return self._client_or_login().secrets.kv.v2

    def _metadata(self, path: str) -> dict[str, Any] | None:
        try:
            answer = self._kv().read_secret_metadata(path=path, mount_point=self.config.mount)
        except hx.InvalidPath:
            return None
        data: dict[str, Any] = answer["data"]
        return data

    def _document(self, path: str, version: int) -> Any:
        answer = self._kv().read_secret_version(path=path, version=version, mount_point=self.config.mount,
                                                raise_on_deleted_version=True)
        return answer["data"]["data"]

    def _read(self, path: str, version: int, where: str, key: ApiKey, *, writing: bool = False) -> StoredState | None:
        return state_from_document(self._document(path, version), self._fingerprint, where, version=str(version),
                                   key=key, writing=writing)

    def _client_or_login(self) -> hvac.Client:
        """The client, logged in; a login-based token (AppRole, Kubernetes) is replaced before its
        lease ends, so a long-running worker never writes with an expired token."""
        if self._client is not None and time.monotonic() < self._login_ends:
            return self._client
        self.close()
        c = self.config
        verify: bool | str = str(c.ca_bundle) if c.ca_bundle else True
        session = SameOriginSession()
        session.verify = verify  # hvac takes a given session's `verify` over its own argument
        client = hvac.Client(url=str(c.url).rstrip("/"), namespace=c.namespace, verify=verify, timeout=c.timeout_s,
                             session=session)
        answer: Any = None
        if c.auth == "token":
            client.token = read_credential(c.token_env, c.token_file, "vault token")
        else:
            mount = c.approle_mount if c.auth == "approle" else c.kubernetes_mount
            try:
                if c.auth == "approle":
                    answer = client.auth.approle.login(
                        role_id=read_credential(c.role_id_env, c.role_id_file, "vault role id"),
                        secret_id=read_credential(c.secret_id_env, c.secret_id_file, "vault secret id"),
                        mount_point=mount,
                    )
                else:
                    answer = client.auth.kubernetes.login(
                        role=c.kubernetes_role, jwt=c.kubernetes_jwt_file.read_text().strip(), mount_point=mount)
            except (hx.Forbidden, hx.Unauthorized, hx.InvalidRequest, hx.InvalidPath) as exc:
                # Refused, not down: the ids, the role or the mount is wrong. Vault's own message
                # names which ("invalid role or secret ID"), never the ids themselves.
                first = str(exc.errors[0] if isinstance(exc.errors, list) and exc.errors else type(exc).__name__)
                what = "role id and secret id" if c.auth == "approle" else "role and service-account token"
                raise AuthenticationError(f"vault {c.auth} login at auth/{mount}/login refused "
                                          f"({first.strip()[:160]}); check the {what} and {c.auth}_mount") from None
        lease = ((answer or {}).get("auth") or {}).get("lease_duration") if isinstance(answer, dict) else None
        # Log in again after three quarters of the lease (a lease of 0 never ends).
        self._login_ends = time.monotonic() + 0.75 * lease if isinstance(lease, int) and lease > 0 else float("inf")
        self._client = client
        self.logins += 1
        return client

    def _errors(self, where: str, logins_before: int | None = None) -> contextlib.AbstractContextManager[None]:
        self._needs = None
        return _vault_errors(self, where, logins_before)


@contextlib.contextmanager
def _vault_errors(sink: VaultSink, where: str, logins_before: int | None = None) -> Iterator[None]:
    """Map hvac and requests errors to the project's tree, in one place; a login since
    `logins_before` (default: since this block began) makes a refusal the policy's answer."""
    logins = sink.logins if logins_before is None else logins_before
    try:
        yield
    except RotatorError:
        raise
    except hx.VaultError as exc:
        first = ""
        if exc.errors:
            first = str(exc.errors[0] if isinstance(exc.errors, list) else exc.errors).strip()[:160]
        raise _mapped(sink, exc, first, where, fresh_login=sink.logins != logins) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientError(f"{where}: cannot reach Vault at {redact_url(sink.config.url)} ({type(exc).__name__})") \
            from None
    except (requests.RequestException, OSError) as exc:
        raise TransientError(f"{where}: {type(exc).__name__}") from None


def _mapped(sink: VaultSink, exc: hx.VaultError, first: str, where: str, *, fresh_login: bool) -> RotatorError:
    detail = f" ({first})" if first else ""
    if isinstance(exc, hx.InvalidRequest) and "check-and-set" in first:
        return WriteConflictError(f"{where}: another writer got there first{detail}")
    if isinstance(exc, hx.Forbidden | hx.Unauthorized):
        sink.close()  # a fresh login may help next time (an expired token)
        if sink.config.auth != "token" and not fresh_login:
            # A login token that expired or was revoked early: the next try logs in afresh. A 403
            # under a login made during this very call is the policy's answer: a refusal.
            return TransientError(f"{where}: permission denied; logging in again")
        needs = f"; the token needs {sink._needs} ({POLICY_DOC})" if sink._needs else ""
        return ForbiddenError(f"{where}: permission denied{needs}")
    if isinstance(exc, hx.VaultDown):
        return TransientError(f"{where}: Vault is unavailable or sealed{detail}")
    if isinstance(exc, VaultSink.transient_errors):
        return TransientError(f"{where}: {type(exc).__name__}{detail}")
    if isinstance(exc, hx.InvalidPath):
        return NotFoundError(f"{where}: path or mount not found")
    return PermanentError(f"{where}: {type(exc).__name__}{detail}")
