"""The values a rotation produces and passes between its steps: results, drift, orphans, and
the few markers the steps use to say what comes next. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from rotator.domain import (
    ApiKey,
    Generation,
    IssuedKey,
    KeyRef,
)
from rotator.errors import (
    RotatorError,
)
from rotator.protocols import (
    SecretSink,
    StoredState,
)

LOCKED = "another rotation of this key is running"
OK_STATUSES = ("succeeded", "recovered", "skipped")
REPLAY_KEPT_S = 86_400  # how long the key service keeps a reset's or create's answer to replay
# Replays are kept 24 h; look for one only for keys reset within twice that (a cost filter, with
# room for clock skew; no causality is decided with it).
REPLAY_LOOKBACK_S = 2 * 86_400
STUCK_S = 86_400  # an attempt unsettled this long raises a critical event on every sweep
#: AWS IAM: an old key used this recently (and after its successor was stored) is still in use.
IN_USE_WINDOW_S = 86_400
STORED_SUCCESSOR = "successor stored"  # the replaced key's stored-rotation slot: when every sink held it
CLOCK_ROOM_S = 3_600  # how far the key service's clock and the state store's may disagree (generous)


@dataclass
class RotationResult:
    """What happened to one key; safe to log, return from a task and store (no secret).

    `status`: succeeded | recovered | skipped (nothing to do) | busy (behind another actor's lease)
    | in_doubt (a reset may have run; recovery settles it) | at_risk (a secret is not in every
    sink; recovery finishes it) | deferred (the fleet's rate budget held it back before anything
    was sent, until `deferred_until`; the next scan or sweep takes it) | failed."""

    client_id: str
    key_id: str
    status: str
    reason: str = ""
    attempt_id: str | None = None
    trigger: str = ""
    sinks: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""  # the operator's --reason, kept in the audit history
    generation: str = ""  # the key's generation this rotation replaced (the key service's dates)
    deferred_until: float | None = None  # deferred: when the rate budget returns (Unix time)
    reload: dict[str, str] = field(default_factory=dict)  # each reload hook run: "ok" or "failed: why"

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "key_id": self.key_id, "status": self.status, "ok": self.ok,
                "reason": self.reason, "attempt_id": self.attempt_id, "trigger": self.trigger,
                "sinks": dict(self.sinks), "timings": dict(self.timings), "note": self.note,
                "generation": self.generation,
                **({"deferred_until": self.deferred_until} if self.deferred_until is not None else {}),
                **({"reload": dict(self.reload)} if self.reload else {})}


@dataclass
class Drift:
    key: ApiKey
    sink: str
    reason: str
    certain: bool = True  # False: it could not be told (an unreadable sink, a failed replay)
    unreadable: bool = False  # the sink could not be read: nothing says its secret is missing


def freshness(stored: StoredState | None, key: ApiKey) -> str:
    """What a sink holds for a key against the key service's last reset: `empty`, `fresh` (the
    current secret), `stale` (an older one: consumers hold a dead secret) or `unknown` (a
    document without the reset date, or one newer than the key)."""
    if stored is None:
        return "empty"
    if stored.key_reset_at == key.born_at:
        return "fresh"
    if stored.key_reset_at is not None and stored.key_reset_at < key.born_at:
        return "stale"
    return "unknown"


def grace_start(successor: ApiKey, slot: dict[str, Any] | None) -> float:
    """When a successor's grace starts: when rotator recorded that every sink held it (`slot`, the
    replaced key's stored-rotation record), and never before the successor's creation."""
    when = slot.get("time") if slot and slot.get("replaced") == f"{STORED_SUCCESSOR} {successor.key_id}" else None
    return max(float(successor.created_at), float(when)) if isinstance(when, int | float) else \
        float(successor.created_at)


class SinkReads:
    """Each sink's state of each key read once for one view (the status page, `status`): the same
    answer, or the same error, serves every later question about it."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str, int], StoredState | RotatorError | None] = {}

    def read(self, sink: SecretSink, key: ApiKey) -> StoredState | None:
        slot = (id(sink), str(key.ref), key.born_at)
        if slot not in self._seen:
            try:
                self._seen[slot] = sink.read_state(key)
            except RotatorError as exc:
                self._seen[slot] = exc
        found = self._seen[slot]
        if isinstance(found, RotatorError):
            raise found
        return found


@dataclass(frozen=True)
class Orphan:
    """A sink entry for a key the key service no longer lists (revoked, or an earlier setup's)."""

    sink: str
    where: str
    ref: KeyRef


@dataclass(frozen=True)
class Derived:
    """What a found answer's Idempotency-Key was derived from (a repair records this, not the key)."""

    generation: Generation
    epoch: int
    action: str


@dataclass(frozen=True)
class Lookup:
    found: tuple[IssuedKey, Derived] | None = None
    unknown: str = ""


class Outcome(Exception):
    """Ends a rotation early with a result (used inside the engine only)."""

    def __init__(self, result: RotationResult) -> None:
        self.result = result


@dataclass(frozen=True)
class Again:
    """An earlier attempt was settled without a stored secret: go on to a fresh reset (or create)."""

    force: bool  # the secret of that attempt is lost: reset whether due or not
    action: str = "reset"  # the earlier attempt's: a create is finished by a create


class _Inline(Executor):
    """Runs submitted work at once in the caller's thread (deterministic simulations)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        from concurrent.futures import Future

        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


INLINE = _Inline()
