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
    RETIRING = "retiring"  # a successor holds its place; revoked after the overlap grace


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
    exempt: str | None = None  # why the key service says to leave it alone (AWS IAM's exemption tag)
    replaces: str | None = None  # the key id this key succeeds, while that key is not revoked (overlap)
    replaced_by: str | None = None  # this key's successor: it is retiring, and revoked after the grace
    provider: str = ""  # "aws-iam": the stored document also carries access_key_id/secret_access_key
    lineage_base: str | None = None  # the alias-template mode: the proved base alias of its lineage

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.client_id, self.key_id)

    @property
    def base_alias(self) -> str:
        """The alias that names the key's place in the sinks: its lineage's base (`payouts` for
        `payouts--r3`, once proved), else its own alias."""
        return self.lineage_base or self.alias

    @property
    def born_at(self) -> int:
        """When the current secret was issued: the last reset, else the creation."""
        return self.last_reset_at if self.last_reset_at is not None else self.created_at

    @property
    def generation(self) -> Generation:
        """Which secret the key holds now, in the key service's own dates."""
        return Generation(self.created_at, self.born_at)


@dataclass(frozen=True, slots=True, order=True)
class Generation:
    """One secret's lifetime of a key, named by the key service's dates only (never this host's clock).

    A reset moves `born_at` forward. Two generations compare by those dates; `str` is the form that
    travels in task arguments and attempt records (`"<CreationDate>:<born_at>"`).
    """

    created_at: int
    born_at: int

    def __str__(self) -> str:
        return f"{self.created_at}:{self.born_at}"

    @classmethod
    def parse(cls, text: str) -> Generation:
        created, _, born = text.partition(":")
        return cls(int(created), int(born))


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
class LastUse:
    """When and for what a key last authenticated (AWS IAM's GetAccessKeyLastUsed)."""

    when: float
    service: str
    region: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key together with the one-time secret that a create or reset returned."""

    key: ApiKey
    secret: Secret = field(repr=False)


class Replay(enum.StrEnum):
    """What the key service's stored answer for an Idempotency-Key says."""

    ANSWER = "answer"  # a stored 200 for the asked key and path
    REFUSED = "refused"  # a stored 4xx: the call did not run
    EMPTY = "empty"  # nothing stored (not yet, never, or expired)
    SPENT = "spent"  # a stored 5xx: the key is used up (blocked for 24 h) and its answer has no secret
    UNKNOWN = "unknown"  # the replay failed, or its answer proves nothing (a 5xx, another key)


@dataclass(frozen=True, slots=True)
class ReplayAnswer:
    kind: Replay
    issued: IssuedKey | None = field(default=None, repr=False)
    reason: str = ""


_SLUG_RE: Final = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """`Auto-generated key` -> `auto-generated-key`, safe in paths and secret names."""
    return _SLUG_RE.sub("-", text.lower()).strip("-") or "key"


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """The durable record of one attempt, written (fenced by the key's lease) before the reset.

    The attempt's Idempotency-Key reads the live secret from the key service's stored answer for
    24 hours, so the record holds what it is derived from, never the key: the key it names
    (`replaces`, else `key_id`), the `generation` being replaced (or `derived_generation`), the
    `epoch`, the `action`, and `derived_with`, the id of the workers' secret it was derived with
    (see `rotator.protocol`). Every actor rotating that generation derives the same one;
    `attempt_id` names this actor's record, so only its writer can delete it. Times are the state
    store's clock (one clock for every worker); causality is judged with the key service's dates only.
    """

    client_id: str
    key_id: str
    attempt_id: str
    generation: str  # the Generation being replaced, as str(); "" for a repair's or an old protocol's record
    epoch: int
    trigger: str
    started_at: float
    phase: str = "resetting"  # see rotator.protocol.Phase
    since: float = 0.0  # when this phase began (state clock): the in-doubt horizon counts from here
    issued_generation: str | None = None  # the generation the answer named, once one came
    fingerprint: str | None = None
    action: str = "reset"  # "create": the overlap strategy's successor key (`Replaces` this key)
    issued_key_id: str | None = None  # the key id the answer named (a create's successor)
    replaces: str | None = None  # a create recorded under its successor (a repair): the key it replaced
    doubt_since: float = 0.0  # when the attempt first went in doubt; kept when it is sent again (0: `since`)
    derived_with: str = ""  # the id of the secret the Idempotency-Key is derived with ("": not recorded)
    derived_generation: str | None = None  # a repair's: the generation its key was derived from
    # This attempt replaces a secret proved lost (the key's live secret is in no sink): "not run"
    # does not end it, since the loss stands; it is sent again with the next epoch's key.
    after_loss: bool = False
    legacy_key: str | None = field(default=None, repr=False)  # an older version's record: the key itself

    @property
    def ref(self) -> KeyRef:
        return KeyRef(self.client_id, self.key_id)

    @property
    def key_named(self) -> KeyRef:
        """The key the Idempotency-Key was derived for: a repaired create's is the key it replaced."""
        return KeyRef(self.client_id, self.replaces or self.key_id)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__ if name != "legacy_key"}
        # An older version reads a record without this field as one of the first protocol (and may
        # reset afresh); with an empty one it can neither send nor replay, so it leaves the record in
        # doubt for an upgraded worker. A record an older version wrote keeps its key until settled.
        data["idempotency_key"] = self.legacy_key or ""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttemptRecord:
        """Read a stored record; one of the first protocol (its attempt id was the Idempotency-Key)
        is read as in doubt with an unknown generation; one an older version wrote (the key itself
        in `idempotency_key`) keeps using that key."""
        if "idempotency_key" not in data:
            return cls(str(data["client_id"]), str(data["key_id"]), str(data["attempt_id"]), "", 0,
                       str(data.get("trigger", "")), float(data.get("started_at", 0.0)), "in_doubt",
                       float(data.get("started_at", 0.0)), legacy_key=str(data["attempt_id"]))
        known = {name: data[name] for name in cls.__slots__ if name in data and name != "legacy_key"}
        return cls(**known, legacy_key=str(data["idempotency_key"]) or None)
