"""The contracts between parts, in one place.

Each is a `Protocol`: an implementation needs the methods, not a base class. The engine depends on
these and on nothing concrete.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from rotator.domain import ApiKey, AttemptRecord, ClientInfo, IssuedKey, KeyRef, ReplayAnswer, Scope, Secret


@runtime_checkable
class KeyService(Protocol):
    """A key service: lists keys, resets one idempotently, and checks that a secret works.

    One that cannot reset keys at all (AWS IAM) says why in a `cannot_reset` attribute; plans and
    the engine then refuse before sending anything."""

    def list_clients(self) -> Iterator[ClientInfo]: ...

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        """Every key of a Client ID, fetched page by page as the caller iterates."""
        ...

    def get_key(self, client_id: str, key_id: str) -> ApiKey: ...

    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        """Reset once; a retry with the same `idempotency_key` returns the same secret.

        Returns only an answer that names this key. Raises `RefusedError` when the service proved
        the reset did not run (a 4xx) and `InDoubtError` for every other failure."""
        ...

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        """The stored answer of the reset of this key sent with `idempotency_key`; never raises."""
        ...

    def create_key(
        self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str,
        replaces: str | None = None,
    ) -> IssuedKey:
        """Create a key; with `replaces`, the successor of that key (same alias, while the replaced
        key is not revoked). Raises like `reset_key`; the answer names a key that `replaces` it."""
        ...

    def replay_create(self, client_id: str, replaces: str | None, idempotency_key: str) -> ReplayAnswer:
        """The stored answer of the create of `replaces`' successor sent with `idempotency_key`
        (Replay.ANSWER only for a 200 naming a key that replaces it); never raises."""
        ...

    def revoke_key(self, client_id: str, key_id: str) -> None:
        """Revoke for good; NotFoundError when it is gone already."""
        ...

    def verify_secret(self, client_id: str, secret: Secret, key_id: str | None = None) -> bool:
        """True when the secret (of `key_id`, for services whose secrets need their key's id)
        authenticates against the key service."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """Everything one sink write needs: the key, the secret and the rotation it belongs to."""

    key: ApiKey
    secret: Secret
    attempt_id: str
    fingerprint: str
    rotated_at: float

    @property
    def ref(self) -> KeyRef:
        return self.key.ref

    @property
    def key_reset_at(self) -> int:
        return self.key.born_at


@dataclass(frozen=True, slots=True)
class StoredState:
    """What a sink says it holds for one key, without the secret."""

    fingerprint: str
    attempt_id: str | None
    rotated_at: str | None
    key_reset_at: int | None
    version: str | None = None
    key_id: str | None = None  # the key the document names (a successor's, at its predecessor's place)
    replaces: str | None = None  # the key the document's key took the place of (overlap), as it says


@runtime_checkable
class SecretSink(Protocol):
    """Somewhere applications read their secret from."""

    kind: ClassVar[str]
    #: exceptions of the sink's client that are safe to retry (mapped to TransientError)
    transient_errors: ClassVar[tuple[type[BaseException], ...]]

    def describe(self, ref: KeyRef | None = None) -> str:
        """A printable location, e.g. `vault:secret/rotator/acme/key_1`; never a credential."""
        ...

    def location(self, key: ApiKey) -> str:
        """Where this key's secret lives in this sink; two keys of one deployment never share one."""
        ...

    def prepare(self, key: ApiKey) -> object:
        """Before the reset: reach the sink, check the right to write, read what the write needs
        (Vault's CAS version, whether the AWS secret exists). Raise a RotatorError if the sink
        cannot take a write now: the key is then not reset. The result goes to `write`."""
        ...

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        """Store the secret, in as few round trips as `prepared` allows; a retry of the same
        attempt that is already stored is a no-op. Writes of one attempt are byte-identical."""
        ...

    def annotate(self, record: SecretRecord) -> None:
        """After every sink holds the secret: metadata that is not on the critical path (Vault
        custom metadata, AWS tags). Failures are reported, not fatal."""
        ...

    def read_state(self, key: ApiKey) -> StoredState | None:
        """What is stored now for the key (its fingerprint and rotation), or None."""
        ...

    def read_secret(self, key: ApiKey) -> Secret | None:
        """The stored secret of `key` (None when nothing of this key is stored). Used only to prove,
        before the overlap strategy revokes the replaced key, that what consumers read works."""
        ...

    def ping(self) -> None:
        """Reach the sink and check the credentials; raise a RotatorError if it cannot."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Event:
    """Something an operator may want to hear about. Never holds a secret."""

    name: str
    severity: str
    client_id: str
    key_id: str
    alias: str = ""
    environment: str = ""
    age_days: float | None = None
    attempt_id: str | None = None
    error: str | None = None
    time: float = 0.0
    details: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.name,
            "severity": self.severity,
            "client_id": self.client_id,
            "key_id": self.key_id,
            "alias": self.alias,
            "environment": self.environment,
            "age_days": self.age_days,
            "attempt_id": self.attempt_id,
            "error": self.error,
            "time": self.time,
            "details": dict(self.details or {}),
        }


class EventPublisher(Protocol):
    def publish(self, event: Event) -> None: ...


class Notifier(Protocol):
    """Delivers one event to one channel; raises TransientError when a retry may help."""

    def send(self, event: Event) -> None: ...


class LeaseLike(Protocol):
    lost: bool

    def kept_alive(self) -> AbstractContextManager[Any]: ...

    def check(self) -> None:
        """Raise `LeaseLostError` once the lease is known to be lost."""
        ...


class StateStore(Protocol):
    """Durable attempt records, fenced leases and history (Redis in production).

    Every write of an attempt record or epoch is conditional on the caller's lease (one atomic
    check-and-write) and raises `LeaseLostError` otherwise."""

    def now(self) -> float:
        """The store's clock, shared by every worker."""
        ...

    def acquire(self, name: str, ttl_s: float) -> Any: ...

    def once(self, name: str, ttl_s: int) -> bool: ...

    def seen(self, name: str) -> bool: ...

    def save_attempt(self, attempt: AttemptRecord, lease: Any) -> None: ...

    def get_attempt(self, ref: KeyRef) -> AttemptRecord | None: ...

    def key_state(self, ref: KeyRef) -> tuple[AttemptRecord | None, dict[str, Any] | None]:
        """`get_attempt` and `stored_rotation` together (one round trip)."""
        ...

    def delete_attempt(self, attempt: AttemptRecord, lease: Any, stored_at: float | None = None,
                       held: tuple[str, list[str]] | None = None) -> None:
        """Fenced; with `stored_at`, `mark_stored_rotation` of the attempt's generation first (one round trip)."""
        ...

    def attempts(self) -> list[AttemptRecord]: ...

    def epoch_and_now(self, ref: KeyRef, generation: str) -> tuple[int, float]:
        """How many conclusive refusals this generation has had, and `now` (one round trip)."""
        ...

    def set_epoch(self, ref: KeyRef, generation: str, epoch: int, lease: Any) -> None: ...

    def record(self, entry: dict[str, Any]) -> object: ...

    def mark_stored_rotation(self, ref: KeyRef, replaced: str, when: float) -> None:
        """rotator stored a rotation that replaced generation `replaced` at `when`."""
        ...

    def stored_rotation(self, ref: KeyRef) -> dict[str, Any] | None: ...

    def put_pending_reload(self, told: dict[str, Any]) -> None: ...

    def pending_reloads(self) -> list[dict[str, Any]]: ...

    def drop_pending_reload(self, told: dict[str, Any]) -> None: ...

    def lineage_links(self, client_id: str) -> dict[str, dict[str, Any]]: ...

    def put_lineage_links(self, client_id: str, links: dict[str, dict[str, Any]], how: str = "merge") -> None:
        ...

    def drop_lineage_links(self, client_id: str, key_ids: list[str]) -> None: ...

    def last_rotation(self, ref: KeyRef) -> dict[str, Any] | None: ...

    def history(self, limit: int = 50) -> list[dict[str, Any]]: ...
