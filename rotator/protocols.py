"""The contracts between parts, in one place.

Each is a `Protocol`: an implementation needs the methods, not a base class. The engine depends on
these and on nothing concrete.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from rotator.domain import ApiKey, AttemptRecord, ClientInfo, IssuedKey, KeyRef, Scope, Secret


@runtime_checkable
class KeyService(Protocol):
    """A key service: lists keys, resets one idempotently, and checks that a secret works."""

    def list_clients(self) -> Iterator[ClientInfo]: ...

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        """Every key of a Client ID, fetched page by page as the caller iterates."""
        ...

    def get_key(self, client_id: str, key_id: str) -> ApiKey: ...

    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        """Reset once; a retry with the same `idempotency_key` returns the same secret."""
        ...

    def replay(self, client_id: str, idempotency_key: str) -> IssuedKey | None:
        """The stored answer of an earlier create/reset, or None once it has expired."""
        ...

    def create_key(
        self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str
    ) -> IssuedKey: ...

    def revoke_key(self, client_id: str, key_id: str) -> None: ...

    def verify_secret(self, client_id: str, secret: Secret) -> bool:
        """True when the secret authenticates against the key service."""
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


@runtime_checkable
class SecretSink(Protocol):
    """Somewhere applications read their secret from."""

    kind: ClassVar[str]
    #: exceptions of the sink's client that are safe to retry (mapped to TransientError)
    transient_errors: ClassVar[tuple[type[BaseException], ...]]

    def describe(self, ref: KeyRef | None = None) -> str:
        """A printable location, e.g. `vault:secret/rotator/acme/key_1`; never a credential."""
        ...

    def write(self, record: SecretRecord) -> StoredState:
        """Store the secret; a retry of the same attempt that is already stored is a no-op."""
        ...

    def read_state(self, key: ApiKey) -> StoredState | None:
        """What is stored now for the key (its fingerprint and rotation), or None."""
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
    def kept_alive(self) -> AbstractContextManager[Any]: ...


class StateStore(Protocol):
    """Durable attempt records, leases and history (Redis in production)."""

    def acquire(self, name: str, ttl_s: float) -> LeaseLike | None: ...

    def once(self, name: str, ttl_s: int) -> bool: ...

    def save_attempt(self, attempt: AttemptRecord) -> None: ...

    def get_attempt(self, ref: KeyRef) -> AttemptRecord | None: ...

    def delete_attempt(self, attempt: AttemptRecord) -> None: ...

    def attempts(self) -> list[AttemptRecord]: ...

    def record(self, entry: dict[str, Any]) -> None: ...

    def last_rotation(self, ref: KeyRef) -> dict[str, Any] | None: ...

    def history(self, limit: int = 50) -> list[dict[str, Any]]: ...
