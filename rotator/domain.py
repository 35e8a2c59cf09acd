"""Plain types shared by every part. No I/O here."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final


class Environment(enum.StrEnum):
    PRODUCTION = "PRODUCTION"
    SANDBOX = "SANDBOX"


class KeyState(enum.StrEnum):
    """What the policy says about one key at one moment."""

    DUE = "due"
    DUE_SOON = "due_soon"
    OK = "ok"
    EXCLUDED = "excluded"
    OUT_OF_SCOPE = "out_of_scope"


class Severity(enum.IntEnum):
    INFO = 10
    WARNING = 20
    ERROR = 30
    CRITICAL = 40


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Names one key: `client_id/key_id`."""

    client_id: str
    key_id: str

    def __str__(self) -> str:
        return f"{self.client_id}/{self.key_id}"


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    read: bool
    write: bool


@dataclass(frozen=True, slots=True)
class ClientInfo:
    client_id: str
    name: str
    environment: Environment


@dataclass(slots=True)
class ApiKey:
    """A key as the key service describes it (never with its secret).

    Treated as immutable; not `frozen` only because a scan builds one per key and a frozen
    dataclass costs several times more to construct.
    """

    client_id: str
    key_id: str
    alias: str
    environment: Environment
    scopes: tuple[Scope, ...]
    created_at: int
    last_reset_at: int | None
    is_auto_generated: bool = False
    status: str = "ACTIVE"

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.client_id, self.key_id)

    @property
    def born_at(self) -> int:
        """When the current secret was issued: the last reset, else the creation."""
        return self.last_reset_at if self.last_reset_at is not None else self.created_at


class Secret:
    """A secret value that refuses to be printed.

    `str`, `repr` and formatting show a redaction; only `reveal()` gives the value, and only the
    sinks and the token check call it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled or sent anywhere")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key together with the one-time secret that a create or reset returned."""

    key: ApiKey
    secret: Secret = field(repr=False)


_SLUG_RE: Final = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """`Auto-generated key` -> `auto-generated-key`, safe in paths and secret names."""
    return _SLUG_RE.sub("-", text.lower()).strip("-") or "key"


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """Written before the reset; its `attempt_id` is the reset's Idempotency-Key."""

    client_id: str
    key_id: str
    attempt_id: str
    trigger: str
    started_at: float
    phase: str = "resetting"  # then "storing" once the key service answered
    reset_at: int | None = None

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.client_id, self.key_id)
