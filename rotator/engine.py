"""One rotation per key generation, over the attempt protocol (`rotator.protocol`).

Scheduled, manual and recovery paths all go through `rotate`: take the key's lease, settle any
earlier attempt first, re-read the key (skip it if the trigger's generation is gone, or if it is
not due), prepare every sink, write the fenced attempt record, reset with the generation's
Idempotency-Key, write every sink, verify, clear. No Celery, HTTP or Redis here: only protocols.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

from rotator import logs
from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Generation,
    IssuedKey,
    KeyRef,
    KeyState,
    Replay,
    ReplayAnswer,
    utc_iso,
)
from rotator.errors import (
    InDoubtError,
    NotFoundError,
    PermanentError,
    RefusedError,
    RotatorError,
    TransientError,
    UnusableAnswerError,
)
from rotator.events import SEVERITY, sanitize
from rotator.fingerprint import Fingerprinter
from rotator.policy import (
    Policy,
    RotationWindow,
    age_days,
    classify,
    in_scope,
    is_due,
    scope_problem,
    strategy_for,
)
from rotator.protocol import (
    DEFAULT_HORIZON_S,
    MAX_EPOCHS,
    Phase,
    ProtocolViolation,
    Step,
    advance,
    derivation_id,
    idempotency_key,
    judge,
    public_name,
)
from rotator.protocols import (
    Event,
    EventPublisher,
    KeyService,
    SecretRecord,
    SecretSink,
    StateStore,
    StoredState,
)
from rotator.scan import every_key
from rotator.state import LeaseLostError

log = logs.get("rotator.engine")
LOCKED = "another rotation of this key is running"
OK_STATUSES = ("succeeded", "recovered", "skipped")
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
    sink; recovery finishes it) | failed."""

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

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "key_id": self.key_id, "status": self.status, "ok": self.ok,
                "reason": self.reason, "attempt_id": self.attempt_id, "trigger": self.trigger,
                "sinks": dict(self.sinks), "timings": dict(self.timings), "note": self.note,
                "generation": self.generation}


@dataclass
class Drift:
    key: ApiKey
    sink: str
    reason: str
    certain: bool = True  # False: it could not be told (an unreadable sink, a failed replay)


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
class _Derived:
    """What a found answer's Idempotency-Key was derived from (a repair records this, not the key)."""

    generation: Generation
    epoch: int
    action: str


@dataclass(frozen=True)
class _Lookup:
    found: tuple[IssuedKey, _Derived] | None = None
    unknown: str = ""


class _Outcome(Exception):
    """Ends a rotation early with a result (used inside the engine only)."""

    def __init__(self, result: RotationResult) -> None:
        self.result = result


@dataclass(frozen=True)
class _Again:
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


class Engine:
    def __init__(
        self, keyservice: KeyService, sinks: list[SecretSink], state: StateStore, publisher: EventPublisher,
        fingerprint: Fingerprinter, policy: Policy, *, sink_retry_s: float = 300.0, verify: bool = True,
        lock_ttl_s: float = 60.0, clock: Callable[[], float] = time.time, actor: str = "",
        clients: list[str] | None = None, horizon_s: float = DEFAULT_HORIZON_S,
        window: RotationWindow | None = None, executor: Executor | None = None,
        sleep: Callable[[float], None] = time.sleep, monotonic: Callable[[], float] = time.monotonic,
        idempotency_secret: bytes | None = None,
    ) -> None:
        if not sinks:
            raise PermanentError("at least one sink is needed")
        self.keyservice = keyservice
        self.sinks = sinks
        self.state = state
        self.publisher = publisher
        self.fingerprint = fingerprint
        self.policy = policy
        self.sink_retry_s = sink_retry_s
        self.verify = verify
        self.lock_ttl_s = lock_ttl_s
        self.clock = clock
        self.actor = actor
        self.clients = clients  # None: every Client ID the key service lists
        self.horizon_s = horizon_s
        self.window = window
        self._sleep = sleep
        self._monotonic = monotonic
        # Every process that builds an engine holds the same `idempotency_secret` (engine.idempotency_key_*);
        # without one, the keys come from the fingerprint key, as before there was a setting.
        self._ik_mac = idempotency_secret or fingerprint.derive(b"idempotency-key")
        self._ik_id = derivation_id(self._ik_mac)
        # One thread per sink plus one for the token check, so no sink write waits for a free thread.
        self._pool = executor or ThreadPoolExecutor(max_workers=len(sinks) + 1, thread_name_prefix="sink")
        self._context = threading.local()  # who asked and why, for the rotation running in this thread

    # --- public ------------------------------------------------------------------------------
    def rotate(self, ref: KeyRef, *, trigger: str, force: bool = False, generation: str | None = None,
               reason: str = "", actor: str | None = None, include_out_of_scope: bool = False,
               strategy: str | None = None) -> RotationResult:
        """Rotate one key once, however many triggers fire for it.

        `generation` is the key's generation the trigger saw (`str(key.generation)`): if the key
        has moved on since, this trigger is already served and nothing is reset. A key the policy
        leaves alone (another environment, excluded) is refused, even with `force`, unless
        `include_out_of_scope` says so too. `strategy` overrides the policy's for this run; a key
        that a successor replaces is retired (revoked once its grace is over) instead."""
        self._begin(reason, actor)
        return self._leased(ref, trigger, lambda lease: self._rotate_locked(
            ref, lease, trigger, force, generation, include_out_of_scope, strategy))

    def record_refusal(self, ref: KeyRef, reason: str, note: str = "", actor: str | None = None) -> RotationResult:
        """A rotation someone asked for and a plan refused (no such key, out of scope, a shared sink
        place): nothing is sent, and the refusal goes into the audit history."""
        self._begin(note, actor)
        result = RotationResult(ref.client_id, ref.key_id, "failed", reason, trigger="manual")
        self._history(result)
        return result

    def recover_all(self) -> list[RotationResult]:
        """Settle every attempt a crash, an outage or a lost answer left behind."""
        self._begin("recovery", None)
        results = []
        for attempt in self.state.attempts():
            results.append(self._leased(attempt.ref, attempt.trigger, partial(self._recover_locked, attempt.ref)))
        return results

    def repair(self) -> tuple[list[Drift], list[RotationResult]]:
        """`reconcile --repair`: settle attempts, then bring every drifted key's sinks up to date,
        by replaying the reset that produced its generation when that is possible (no second
        reset, even without any state in Redis) and by a fresh reset only when it is not."""
        results = self.recover_all()
        drift = self.drift()
        for ref in dict.fromkeys(d.key.ref for d in drift):
            self._begin("reconcile --repair", None)
            results.append(self._leased(ref, "reconcile", partial(self._repair_locked, ref)))
        return drift, results

    def drift(self, alert: bool = True, keys: Iterable[ApiKey] | None = None,
              reads: SinkReads | None = None) -> list[Drift]:
        """Sinks that do not hold the key's current secret (consumers hold a dead one), and keys
        whose current secret rotator issued but no sink holds (found by replay, without Redis).
        `alert=False` for a read-only view (`status`, the status page): it sends no event. A view
        that has listed the keys and read the sinks already passes them (`keys`, `reads`), so
        nothing is listed or read twice."""
        found: list[Drift] = []
        for key in keys if keys is not None else every_key(self.keyservice, self.clients):
            if key.replaced_by is not None:  # retiring: its place holds its successor
                continue
            if key.replaces is not None and self.state.get_attempt(KeyRef(key.client_id, key.replaces)):
                found.extend(Drift(key, s.describe(key.ref), "its predecessor's create is not settled yet",
                                   certain=False) for s in self.sinks)
            elif scope_problem(key, self.policy) is None:  # excluded keys are someone else's to keep
                found.extend(self._drift_of(key, reads))
        for d in found if alert else ():
            self.emit("drift.detected", d.key, error=f"{d.sink}: {d.reason}")
        return found

    def orphans(self) -> tuple[list[Orphan], list[tuple[str, str]]]:
        """Entries of sinks that can list what they hold, for keys of the managed Client IDs that
        the key service does not list any more: dead secrets, reported for a person to delete
        (rotator never deletes a stored secret). Also the sinks that could not be listed, and why
        (a role allowed to write its own paths may not list the store)."""
        live = {str(key.ref) for key in every_key(self.keyservice, self.clients)}
        configured = set(self.clients) if self.clients is not None else None
        found: list[Orphan] = []
        unchecked: list[tuple[str, str]] = []
        for sink in self.sinks:
            listing = getattr(sink, "stored_refs", None)
            if listing is None:
                continue
            try:
                for where, ref in listing():
                    if str(ref) not in live and (configured is None or ref.client_id in configured):
                        found.append(Orphan(sink.describe(), where, ref))
            except RotatorError as exc:
                unchecked.append((sink.describe(), str(exc)))
        return found, unchecked

    def warn(self, now: float) -> dict[str, int]:
        """`key.due_soon` for keys in the warning period; `key.overdue` for keys past due and not
        rotated (audit mode, excluded, outside the window, failing)."""
        counts = {"due_soon": 0, "overdue": 0}
        for key in every_key(self.keyservice, self.clients):
            state = classify(key, now, self.policy)
            if state is KeyState.DUE_SOON:
                self.emit("key.due_soon", key)
                counts["due_soon"] += 1
            elif key.replaced_by is None and in_scope(key, self.policy) and is_due(key, now, self.policy):
                why = scope_problem(key, self.policy) or "due and not rotated yet"  # excluded or exempt: why
                self.emit("key.overdue", key, error=why)
                counts["overdue"] += 1
        return counts

    def close(self) -> None:
        if isinstance(self._pool, ThreadPoolExecutor):
            self._pool.shutdown(wait=False)

    # --- under the key's lease -----------------------------------------------------------------
    def _leased(self, ref: KeyRef, trigger: str, work: Callable[[Any], RotationResult]) -> RotationResult:
        lease = self.state.acquire(f"key:{ref}", self.lock_ttl_s)
        if lease is None:
            return RotationResult(ref.client_id, ref.key_id, "busy", LOCKED, trigger=trigger)
        with lease.kept_alive():
            try:
                return work(lease)
            except _Outcome as outcome:
                return outcome.result
            except LeaseLostError as exc:
                log.error("rotation.lease_lost", client_id=ref.client_id, key_id=ref.key_id, error=str(exc))
                return RotationResult(ref.client_id, ref.key_id, "busy",
                                      f"{exc}; stopped there, the lease's new holder settles this key", trigger=trigger)

    def _rotate_locked(self, ref: KeyRef, lease: Any, trigger: str, force: bool,
                       generation: str | None, include_out_of_scope: bool = False,
                       strategy: str | None = None) -> RotationResult:
        pending = self.state.get_attempt(ref)
        resumed = False  # an earlier attempt, already allowed, must be finished by a fresh reset
        if pending is not None:
            settled = self._settle(pending, lease)
            if isinstance(settled, RotationResult):
                return settled
            resumed = settled.force
            force = force or settled.force
            generation = None if settled.force else generation
            strategy = "overlap" if settled.action == "create" else strategy
        key = self._get_key(ref, trigger)
        if generation is not None and str(key.generation) != generation:
            return self._skipped(key, trigger, "rotated since the trigger")
        if key.replaced_by is not None:  # a successor holds its place: retire it, never rotate it
            scope = scope_problem(replace(key, status="ACTIVE"), self.policy)
            if scope is not None and not include_out_of_scope:
                return self._out_of_scope(key, trigger, scope)
            return self._retire(key, lease, trigger)
        scope = scope_problem(key, self.policy)
        if scope is not None and not include_out_of_scope and not resumed:
            return self._out_of_scope(key, trigger, scope)
        if not force and not is_due(key, self.clock(), self.policy):
            return self._skipped(key, trigger, "not due")
        # Since rotator's last stored reset of this key, did its dates stay where they were (a key
        # service that does not update them, or two resets within one second)?
        unmoved_for = self._unmoved_since_rotation(key)
        new_key = False
        if force and unmoved_for is not None and unmoved_for < REPLAY_LOOKBACK_S:
            # A reset now would send that reset's Idempotency-Key and get its answer replayed.
            if generation is not None:  # a message: a rotation has served the dates it saw
                return self._skipped(key, trigger, "rotated since the trigger (the key's dates did not move)")
            new_key = True  # a person forced it: the next epoch's key
        if not force and unmoved_for is not None and unmoved_for < self.policy.max_age_days * 86_400:
            why = ("rotated by rotator, but the key service still shows the reset date it replaced (a protocol "
                   "error of the key service); the key's age counts from that rotation, so it is not reset again")
            self.emit("keyservice.protocol_error", key, None, why)
            return self._skipped(key, trigger, why)
        if trigger == "schedule" and self.window is not None and not self.window.contains(
                datetime.fromtimestamp(self.clock(), UTC)):
            return self._skipped(key, trigger, "outside the rotation window")
        return self._reset(key, lease, trigger, new_key=new_key, strategy=strategy, after_loss=resumed)

    def _unmoved_since_rotation(self, key: ApiKey) -> float | None:
        """Seconds since rotator stored a rotation that replaced this very generation, which the key
        service still shows (its dates did not move); None when there is none. Within the replay
        window a reset would only replay that rotation; within `max_age_days` the key's age counts
        from it, so there is no reset loop. (The slot is its own: later failures do not overwrite it.)"""
        slot = self.state.stored_rotation(key.ref)
        when = slot.get("time") if slot else None
        if slot is None or slot.get("replaced") != str(key.generation) or not isinstance(when, int | float):
            return None
        return self.clock() - when

    def _recover_locked(self, ref: KeyRef, lease: Any) -> RotationResult:
        pending = self.state.get_attempt(ref)
        if pending is None:
            return RotationResult(ref.client_id, ref.key_id, "skipped", "settled meanwhile")
        settled = self._settle(pending, lease)
        if isinstance(settled, RotationResult):
            return settled
        if settled.force:
            return self._reset(self._get_key(ref, "recovery"), lease, "recovery",
                               strategy="overlap" if settled.action == "create" else "reset", after_loss=True)
        return self._rotate_locked(ref, lease, pending.trigger, False, None,
                                   strategy="overlap" if pending.action == "create" else None)

    def _repair_locked(self, ref: KeyRef, lease: Any) -> RotationResult:
        if self.state.get_attempt(ref) is not None:
            return self._recover_locked(ref, lease)
        key = self._get_key(ref, "reconcile")
        lookup = self._replay_lost(key)
        if lookup.found is not None:
            issued, derived = lookup.found
            now = self.state.now()
            created = issued.key.replaces if derived.action == "create" else None  # a successor's create
            record = AttemptRecord(ref.client_id, ref.key_id, str(uuid.uuid4()), "", derived.epoch, "reconcile", now,
                                   Phase.STORING.value, now, str(issued.key.generation), action=derived.action,
                                   issued_key_id=issued.key.key_id, replaces=created, derived_with=self._ik_id,
                                   derived_generation=str(derived.generation))
            self.state.save_attempt(record, lease)
            return self._store(issued, record, lease, "rotation.recovered", prepared=None)
        drift = self._drift_of(key)
        if not drift:
            return self._skipped(key, "reconcile", "no drift any more")
        doubts = [f"{d.sink}: {d.reason}" for d in drift if not d.certain]
        doubts += [lookup.unknown] if lookup.unknown else []
        if doubts:  # a replay may still find the secret, or a sink cannot be read: never reset afresh on that
            return self._failed(key, None, f"not repaired, not reset afresh: {'; '.join(doubts)}", trigger="reconcile")
        scope = scope_problem(key, self.policy)
        if scope is not None:  # a key the policy leaves alone is never reset by a repair
            return self._out_of_scope(key, "reconcile", scope)
        self.emit("rotation.secret_at_risk", key, None,
                  "no sink holds the key's current secret and its reset cannot be replayed; resetting afresh")
        return self._reset(key, lease, "reconcile", after_loss=True)

    # --- the overlap strategy's end: retire the replaced key ----------------------------------
    def _retire(self, key: ApiKey, lease: Any, trigger: str) -> RotationResult:
        """Revoke a key its successor replaces, once the grace is over (`--force` does not shorten
        it: a second forced run must not cut consumers off), and only while every sink holds the
        successor and its stored secret authenticates. A key service with a deactivation step (AWS
        IAM) deactivates first, refuses a key still in use since its successor was stored, and
        deletes `delete_after_s` later. Everything here is derived from the key service and the
        sinks: a crash anywhere is finished by the next run."""
        try:
            successor = self.successor(key)
        except RotatorError as exc:
            return self._failed(key, None, f"not revoked: cannot read its successor ({exc})", trigger=trigger)
        if successor is None:
            return self._skipped(key, trigger, f"its successor {key.replaced_by} is gone; nothing revoked")
        two_stage = hasattr(self.keyservice, "deactivate_key")
        deactivate = two_stage and key.status == "ACTIVE"
        when = self.retire_at(key, successor)
        if self.clock() < when:
            verb = "deleted" if key.status != "ACTIVE" else "deactivated" if two_stage else "revoked"
            return self._skipped(key, trigger, f"retiring: {verb} after {utc_iso(when)} "
                                               f"(successor {successor.key_id})")
        problem = self._successor_problem(successor)
        if problem is not None:
            return self._failed(key, None, f"not revoked: {problem}", trigger=trigger)
        if deactivate:
            try:
                used = self.keyservice.last_used(key.client_id, key.key_id)  # type: ignore[attr-defined]
            except RotatorError as exc:
                return self._failed(key, None, f"not deactivated: cannot read its last use ({exc})", trigger=trigger)
            recent = self.clock() - min(IN_USE_WINDOW_S, self.policy.overlap_grace_s / 2)
            if used is not None and used.when > max(successor.created_at, recent):
                why = (f"used at {utc_iso(used.when)} ({used.service}, {used.region}), after its successor "
                       f"{successor.key_id} was stored and within the last "
                       f"{min(IN_USE_WINDOW_S, self.policy.overlap_grace_s / 2) / 3600:g} h; not deactivated")
                self.emit("key.still_in_use", key, None, why,
                          {"service": used.service, "region": used.region, "last_used": utc_iso(used.when)})
                result = RotationResult(key.client_id, key.key_id, "failed", why, trigger=trigger)
                self._history(result)
                return result
        lease.check()
        try:
            if deactivate:
                self.keyservice.deactivate_key(key.client_id, key.key_id)  # type: ignore[attr-defined]
            else:
                self.keyservice.revoke_key(key.client_id, key.key_id)
        except NotFoundError:
            return self._skipped(key, trigger, "revoked already")
        except RotatorError as exc:
            return self._failed(key, None, f"revoking failed: {exc}", trigger=trigger)
        event, verb = ("key.deactivated", "deactivated") if deactivate else ("key.revoked", "revoked")
        self.emit(event, key, None, None, {"successor": successor.key_id})
        result = RotationResult(key.client_id, key.key_id, "succeeded",
                                f"{verb}; replaced by {successor.key_id}", trigger=trigger,
                                generation=str(key.generation))
        self._history(result)
        return result

    def stored_at(self, successor: ApiKey) -> float:
        """When consumers could first read the successor: its creation at the key service, or later
        when rotator recorded that every sink held it (a sink that was down gets the whole grace
        too). Without that record (Redis lost), the creation date."""
        replaced = successor.replaces
        slot = self.state.stored_rotation(KeyRef(successor.client_id, replaced)) if replaced else None
        return grace_start(successor, slot)

    def retire_at(self, key: ApiKey, successor: ApiKey) -> float:
        """When a retiring key's next step is due: revoked (or deactivated) after the grace, and an
        already deactivated one deleted `delete_after_s` later."""
        revoke_at = self.stored_at(successor) + self.policy.overlap_grace_s
        if key.status == "ACTIVE":
            return revoke_at
        return revoke_at + float(getattr(self.keyservice, "delete_after_s", 0.0))

    def _successor_problem(self, successor: ApiKey) -> str | None:
        """Why the successor is not yet what every consumer reads, or None: every sink's document is
        the successor's own, with one fingerprint, and the stored secret authenticates."""
        fingerprints = set()
        for sink in self.sinks:
            name = sink.describe(successor.ref)
            try:
                stored = sink.read_state(successor)
            except RotatorError as exc:
                return f"{name} cannot be read ({exc})"
            if stored is None or stored.key_id != successor.key_id or stored.key_reset_at != successor.born_at:
                return f"{name} does not hold successor {successor.key_id}"
            fingerprints.add(stored.fingerprint)
        if len(fingerprints) != 1:
            return "the sinks hold different secrets of the successor"
        try:
            secret = self.sinks[0].read_secret(successor)
        except RotatorError as exc:
            return f"{self.sinks[0].describe(successor.ref)} cannot be read ({exc})"
        if secret is None or self.fingerprint(secret) not in fingerprints:
            return "the stored secret changed while it was checked"
        try:
            if not self.keyservice.verify_secret(successor.client_id, secret, key_id=successor.key_id):
                return f"the stored secret of successor {successor.key_id} does not authenticate"
        except RotatorError as exc:
            return f"could not check the successor's secret: {exc}"
        return None

    # --- the protocol's steps ------------------------------------------------------------------
    def _reset(self, key: ApiKey, lease: Any, trigger: str, new_key: bool = False,
               strategy: str | None = None, after_loss: bool = False) -> RotationResult:
        """Reset (or, by the overlap strategy, create the successor) under the generation's
        Idempotency-Key; `new_key`: under the next epoch's (the current one's answer is a rotation
        already stored); `after_loss`: it replaces a secret proved lost, so a refusal does not end it."""
        ref = key.ref
        cannot = getattr(self.keyservice, "cannot_reset", None)
        action = "create" if strategy_for(key, self.policy, strategy, can_reset=cannot is None) == "overlap" \
            else "reset"
        if action == "create" and key.replaces is not None and cannot is None:
            action = "reset"  # its predecessor still lives: a successor of a successor is refused
        if action == "reset" and cannot is not None:  # nothing is sent, nothing recorded
            return self._failed(key, None, f"{cannot}; nothing was sent", trigger=trigger)
        if action == "create":
            moving = self._places_moving_with_key_id(key)
            if moving:
                return self._failed(key, None, f"overlap: {moving} names the key id, so consumers would not find "
                                               "the successor; use {alias} in its path; nothing was created",
                                    trigger=trigger)
        prepared = self._prepare_sinks(key)
        if isinstance(prepared, str):
            return self._failed(key, None, f"{prepared}; the key was not reset", trigger=trigger)
        generation = str(key.generation)
        epoch = self.state.epoch(ref, generation) + (1 if new_key else 0)
        if epoch >= MAX_EPOCHS:  # beyond what recovery without Redis reads: never sent
            return self._failed(key, None, f"{MAX_EPOCHS} Idempotency-Keys of this generation are used up (refused, "
                                           "failed or forced); nothing reset. The count expires two days after its "
                                           "last use", trigger=trigger)
        if new_key:
            self.state.set_epoch(ref, generation, epoch, lease)
        now = self.state.now()
        record = AttemptRecord(ref.client_id, ref.key_id, str(uuid.uuid4()), generation, epoch, trigger, now,
                               advance(Phase.IDLE, Step.START).to.value, now, action=action, derived_with=self._ik_id,
                               after_loss=after_loss)
        return self._send(key, record, lease, prepared, "rotation.succeeded")

    def _resend(self, key: ApiKey, record: AttemptRecord, lease: Any, success_event: str,
                step: Step = Step.NOT_RUN) -> RotationResult:
        """Nothing ran within the horizon: send again at once, whatever the due check or the window
        says (the rotation was started). `NOT_RUN`: the same Idempotency-Key (an unused key runs; a
        commit later than any horizon used it, and its 409 leads to that answer). `SPENT`: the key
        is used up by a call that failed, so the next epoch's key. A sink that cannot take the
        answer keeps the record in doubt."""
        prepared = self._prepare_sinks(key)
        if isinstance(prepared, str):
            return self._unsettled(record, f"the reset did not run so far; {prepared}, so it is sent again "
                                           "once it is", key)
        if step is Step.SPENT:
            epoch = record.epoch + 1
            if epoch >= MAX_EPOCHS:
                self._refused(record, lease)
                return self._failed(key, record, f"{MAX_EPOCHS} Idempotency-Keys of this generation are used up "
                                                 "without a reset; nothing reset. The count expires two days after "
                                                 "its last use")
            self.state.set_epoch(record.ref, record.generation, epoch, lease)
            record = replace(record, epoch=epoch, legacy_key=None, derived_with=self._ik_id)
        record = replace(record, phase=advance(Phase.IN_DOUBT, step).to.value, since=self.state.now(),
                         doubt_since=record.doubt_since or record.since)
        return self._send(key, record, lease, prepared, success_event)

    def _send(self, key: ApiKey, record: AttemptRecord, lease: Any, prepared: dict[int, object],
              success_event: str) -> RotationResult:
        """Write the record (fenced), check the lease, reset with the record's key, classify the answer."""
        ref = key.ref
        lease.check()
        self.state.save_attempt(record, lease)  # durable and fenced before the reset: the hinge
        log.info("rotation.started", client_id=ref.client_id, key_id=ref.key_id, attempt_id=record.attempt_id,
                 generation=record.generation, trigger=record.trigger, actor=self._actor(),
                 note=getattr(self._context, "note", ""))
        started = self._monotonic()
        lease.check()  # outside the try: a lost lease is no answer of the key service
        try:
            if record.action == "create":
                issued = self.keyservice.create_key(ref.client_id, key.alias, key.scopes, self._key_of(record),
                                                    replaces=key.key_id)
            else:
                issued = self.keyservice.reset_key(ref.client_id, ref.key_id, self._key_of(record))
        except RefusedError as exc:
            return self._refusal(key, record, lease, exc)
        except (InDoubtError, TransientError) as exc:
            if isinstance(exc, UnusableAnswerError):  # it ran and answered something unusable: loud
                self.emit("keyservice.protocol_error", key, record, f"reset answer unusable: {exc}")
            return self._doubt(key, record, lease, str(exc))
        except RotatorError as exc:  # anything else the adapter raised: the reset may have run
            return self._doubt(key, record, lease, f"{type(exc).__name__}: {exc}")
        advance(Phase.RESETTING, Step.ANSWERED)
        return self._store(issued, record, lease, success_event, prepared, started, before=key)

    def _refusal(self, key: ApiKey, record: AttemptRecord, lease: Any, exc: RefusedError) -> RotationResult:
        """A 4xx proves that this request did not run, not that its Idempotency-Key never did:
        another actor may have sent the same key (after a Redis restart, say). The key service's
        store decides: a stored refusal burns the key (next epoch); a stored answer is stored;
        nothing stored (a gateway's 4xx) leaves the attempt in doubt."""
        answer = ReplayAnswer(Replay.REFUSED) if exc.stored else self._replay(record)
        if answer.kind is Replay.REFUSED or not getattr(self.keyservice, "stores_answers", True):
            if record.after_loss:
                return self._still_lost(key, record, lease, f"the fresh reset was refused ({exc})")
            self._refused(record, lease)
            return self._failed(key, record, f"reset refused, nothing was reset: {exc}")
        return self._doubt(key, record, lease, f"reset refused ({exc}), but the key service stored no refusal "
                                               "for its key: another call with it may have run")

    def _doubt(self, key: ApiKey, record: AttemptRecord, lease: Any, why: str) -> RotationResult:
        """The reset may have run: the record says so durably, then one replay may settle it now."""
        now = self.state.now()
        record = replace(record, phase=advance(Phase.RESETTING, Step.NO_ANSWER).to.value, since=now,
                         doubt_since=record.doubt_since or now)
        self.state.save_attempt(record, lease)
        self.emit("rotation.in_doubt", key, record, why)
        settled = self._settle(record, lease, why, success_event="rotation.succeeded", resend=False)
        if isinstance(settled, RotationResult):
            return settled
        if settled.force:
            return self._failed(key, record, f"reset failed ({why}) and the key was reset by another since; "
                                             "the next trigger resets it afresh")
        return self._failed(key, record, f"reset failed ({why}); the stored answer says it did not run")

    def _settle(self, record: AttemptRecord, lease: Any, why: str = "", success_event: str = "rotation.recovered",
                resend: bool = True) -> RotationResult | _Again:
        """Decide an earlier attempt by replay and the key's generation (protocol.judge)."""
        ref = record.ref
        try:
            key = self.keyservice.get_key(ref.client_id, ref.key_id)
        except NotFoundError:
            if record.action == "create":  # the replaced key was revoked: its successor may live on
                return self._settle_orphaned_create(record, lease, success_event)
            self.state.delete_attempt(record, lease)
            return self._result(ref, record, "failed", "the key no longer exists; attempt record cleared")
        except RotatorError as exc:
            return self._unsettled(record, f"cannot read the key: {exc}")
        phase = Phase(record.phase)
        if phase is Phase.RESETTING:  # its actor died mid-call: in doubt from now on
            phase = advance(phase, Step.NO_ANSWER).to
            record = replace(record, phase=phase.value, since=self.state.now())
            self.state.save_attempt(record, lease)
        replay = self._replay(record)
        answered = replay.issued.key.generation if replay.issued is not None else None
        replaced = Generation.parse(record.generation) if record.generation else None
        successor, gone = None, False
        if record.action == "create":
            # A create's lineage: its generation is the successor's once one exists. With an answer in
            # hand, that key itself is asked for (a lagging replica may not show the link yet).
            named = replay.issued.key.key_id if replay.kind is Replay.ANSWER and replay.issued else None
            try:
                successor = self.successor(key) if named is None else self.keyservice.get_key(ref.client_id, named)
            except NotFoundError:
                gone = True  # the key that answer created is revoked: its secret is dead
            except RotatorError as exc:
                return self._unsettled(record, f"cannot read the successor: {exc}", key)
        now_generation = successor.generation if successor is not None else key.generation
        step = judge(phase, replaced, now_generation, replay.kind, answered,
                     self.state.now() - record.since, self.horizon_s)
        if gone:
            step = Step.LOST
        if step is Step.REFUSED and record.after_loss:  # "not run" does not end the loss it was to repair
            step = Step.STILL_LOST
        try:
            advance(phase, step)
        except ProtocolViolation as exc:
            self.emit("rotation.secret_at_risk", key, record, f"the key service contradicts itself: {exc}")
            return self._unsettled(record, f"protocol violation ({exc}); a person must look", key)
        if step is Step.ANSWERED and replay.issued is not None:
            return self._store(replay.issued, record, lease, success_event, prepared=None)
        if step is Step.NO_ANSWER:
            detail = replay.reason or "nothing stored yet"
            return self._unsettled(record, "; ".join(filter(None, [why, f"replay: {detail}"])), key)
        if step is Step.STILL_LOST:
            return self._still_lost(key, record, lease, "the fresh reset's stored answer is a refusal")
        if step is Step.REFUSED:
            self._refused(record, lease)
            log.info("rotation.settled", client_id=ref.client_id, key_id=ref.key_id, outcome="not run (refused)")
            return _Again(force=False, action=record.action)
        if step in (Step.NOT_RUN, Step.SPENT):  # the record is never dropped on this verdict: it is sent again
            again = "the same key" if step is Step.NOT_RUN else "the next epoch's key (the used one failed)"
            log.info("rotation.settled", client_id=ref.client_id, key_id=ref.key_id, outcome=f"not run; {again} sent")
            if not resend:
                return self._unsettled(record, f"the reset did not run so far; {again} is sent next", key)
            return self._resend(key, record, lease, success_event, step)
        # LOST: the reset ran and its answer cannot be had. Say so before touching any state.
        why_lost = ("the key was reset again after that attempt" if replay.kind is Replay.ANSWER
                    else "the reset ran but its answer cannot be replayed")
        if record.action == "create":
            orphan = self._drop_orphan(key, successor, record, lease)
            if orphan is not None:
                return orphan
        self.emit("rotation.secret_at_risk", key, record, f"{why_lost}; resetting afresh")
        # The record stays until the fresh attempt's record replaces it: a crash before that fresh
        # reset leaves this verdict to be reached again, never a key nobody will reset.
        return _Again(force=True, action=record.action)

    def _replay(self, record: AttemptRecord) -> ReplayAnswer:
        """The key service's stored answer to the record's call (a reset, or a successor's create)."""
        if record.action == "create":
            return self.keyservice.replay_create(record.client_id, record.replaces or record.key_id,
                                                 self._key_of(record))
        return self.keyservice.replay(record.client_id, record.key_id, self._key_of(record))

    def _key_of(self, record: AttemptRecord) -> str:
        """The record's Idempotency-Key, derived again from what the record holds (never stored: it
        reads the live secret). One derived with another secret (a process configured differently,
        or the setting changed while it was in flight) is never sent under a different key: it waits
        for a process that holds that secret."""
        if record.legacy_key:
            return record.legacy_key
        if record.derived_with and record.derived_with != self._ik_id:
            raise _Outcome(self._unsettled(record, (
                "its Idempotency-Key was derived with another secret than this process's (engine.idempotency_key_*: "
                "a process configured differently started it, or the setting changed while it was in flight); "
                "settle it where that secret is, or put that secret back")))
        generation = record.generation if record.derived_generation is None else record.derived_generation
        return idempotency_key(self._ik_mac, record.key_named, Generation.parse(generation), record.epoch,
                               record.action)

    def successor(self, key: ApiKey) -> ApiKey | None:
        """The key that replaces `key`, as the key service shows it now (None: none, or revoked)."""
        if key.replaced_by is None:
            return None
        try:
            successor = self.keyservice.get_key(key.client_id, key.replaced_by)
        except NotFoundError:
            return None
        # Only a key that names this one as the key it replaces, with its alias, is its successor (a
        # key service that links an unrelated key must not get that key revoked, or this one).
        if successor.replaces != key.key_id or successor.alias != key.alias:
            return None
        return successor

    def _holders(self, key: ApiKey) -> tuple[list[str], list[str]]:
        """The sinks whose document is `key`'s own, and those that cannot be read."""
        holding, unreadable = [], []
        for sink in self.sinks:
            try:
                stored = sink.read_state(key)
            except RotatorError as exc:
                unreadable.append(f"{sink.describe(key.ref)}: {exc}")
                continue
            if stored is not None and stored.key_id == key.key_id and stored.key_reset_at == key.born_at:
                holding.append(sink.describe(key.ref))
        return holding, unreadable

    def _places_moving_with_key_id(self, key: ApiKey) -> str:
        """The sinks whose place for a key changes with its id (the overlap strategy needs one that
        stays put), as a printable list; "" when there is none."""
        moving = []
        for sink in self.sinks:
            other = key.key_id[:-1] + ("1" if key.key_id[-1:] == "0" else "0")  # a valid id of the same length
            try:
                here = sink.location(key)
            except RotatorError:
                continue  # an id no path may be built from: prepare refuses it
            try:
                moved = sink.location(replace(key, key_id=other)) != here
            except RotatorError:
                moved = True  # cannot tell: refuse
            if moved:
                moving.append(sink.describe())
        return ", ".join(moving)

    def _drop_orphan(self, key: ApiKey, successor: ApiKey | None, record: AttemptRecord,
                     lease: Any) -> RotationResult | None:
        """A create ran and its answer is gone: the successor it made is a key nobody holds the secret
        of. Revoke it (it would block a new successor, and IAM's two-key limit) and burn the
        epoch, so the next create is a new call; never when a sink holds it or cannot be read, and
        never a key this attempt cannot have made (older than the attempt, or already used: nobody
        had its secret), which is someone else's: then this create did not run."""
        if successor is None and record.issued_key_id:  # the answer came once: that key, if it lives
            try:
                successor = self.keyservice.get_key(key.client_id, record.issued_key_id)
            except NotFoundError:
                successor = None
            except RotatorError as exc:
                return self._unsettled(record, f"cannot read the successor: {exc}", key)
        if successor is not None and successor.key_id != record.issued_key_id:
            foreign = self._not_made_by(successor, record)
            if foreign:
                self._refused(record, lease)
                return self._failed(key, record, f"successor {successor.key_id} was not made by this rotation "
                                                 f"({foreign}); nothing revoked, nothing created")
        if successor is not None:
            holding, unreadable = self._holders(successor)
            finished = self._finish_from_sinks(successor, record, lease, holding, unreadable)
            if finished is not None:
                return finished
            if holding or unreadable:
                why = "; ".join([f"{h} holds it" for h in holding] + unreadable)
                return self._unsettled(record, f"the create's answer is gone but successor {successor.key_id} "
                                               f"may be held ({why}); a person must decide", key)
            lease.check()
            try:
                self.keyservice.revoke_key(key.client_id, successor.key_id)
            except NotFoundError:
                pass
            except RotatorError as exc:
                return self._unsettled(record, f"cannot revoke successor {successor.key_id}, whose secret nobody "
                                               f"holds: {exc}", key)
            log.warning("rotation.orphan_revoked", client_id=key.client_id, key_id=key.key_id,
                        successor=successor.key_id)
        # Nothing is outstanding any more: the next create is a new call under the next epoch (the
        # old key would replay the dead answer), and the key, still due, is created again.
        if record.generation:
            self.state.set_epoch(record.ref, record.generation, record.epoch + 1, lease)
        self.state.delete_attempt(record, lease)
        return None

    def _settle_orphaned_create(self, record: AttemptRecord, lease: Any, success_event: str) -> RotationResult:
        """A create whose replaced key was revoked meanwhile (by a person): its successor still
        lives, so its secret is still owed to the sinks, from the create's answer or, once that is
        gone, from a sink that holds it. The record ends only once the successor is stored, or is
        proved gone; anything unsure keeps it."""
        ref = record.ref
        answer = self._replay(record)
        if answer.kind is Replay.UNKNOWN:
            return self._unsettled(record, f"the replaced key is gone; replay: {answer.reason}")
        named = answer.issued.key.key_id if answer.kind is Replay.ANSWER and answer.issued else record.issued_key_id
        if named is None:  # no answer ever came and none is stored: no key to finish
            self.state.delete_attempt(record, lease)
            return self._result(ref, record, "failed", "the replaced key no longer exists and no successor was "
                                                       "answered; attempt record cleared")
        try:
            successor = self.keyservice.get_key(ref.client_id, named)
        except NotFoundError:
            self.state.delete_attempt(record, lease)
            return self._result(ref, record, "failed", f"the replaced key and its successor {named} are both gone; "
                                                       "attempt record cleared")
        except RotatorError as exc:
            return self._unsettled(record, f"the replaced key is gone; cannot read successor {named}: {exc}")
        # The record proves what the revoke erased from the key service: the successor replaced that key,
        # whose document a sink may still hold.
        successor = replace(successor, replaces=successor.replaces or record.replaces or record.key_id)
        if answer.kind is Replay.ANSWER and answer.issued is not None and \
                successor.generation == answer.issued.key.generation:
            return self._store(answer.issued, record, lease, success_event, prepared=None)
        finished = self._finish_from_sinks(successor, record, lease, *self._holders(successor))
        if finished is not None:
            return finished
        self.emit("rotation.secret_at_risk", successor, record,
                  "its replaced key was revoked and its secret is not in every sink")
        return self._unsettled(record, f"the replaced key is gone and successor {named} is not in every sink",
                               successor)

    def _finish_from_sinks(self, successor: ApiKey, record: AttemptRecord, lease: Any, holding: list[str],
                           unreadable: list[str]) -> RotationResult | None:
        """With no answer to replay: nothing is owed when every sink holds the successor's current
        secret; when some do, the others are written from them (IAM keeps no answers). None: neither."""
        if len(holding) == len(self.sinks):
            self._mark_successor_stored(record, successor)  # the grace counts from no earlier than now
            self.state.delete_attempt(record, lease)
            return self._result(record.ref, record, "skipped", f"settled: successor {successor.key_id}'s "
                                                               "current secret is in every sink")
        if holding and not unreadable:
            copied = self._copy_from_sinks(successor, record)
            if copied is not None:
                return self._store(copied, record, lease, "rotation.recovered", prepared=None)
        return None

    def _mark_successor_stored(self, record: AttemptRecord, successor: ApiKey) -> None:
        """Every sink holds the successor from now on: its grace starts here (only ever later, so a
        sink written late, or found holding it by a later settle, gives its consumers the whole grace)."""
        when = max(self.clock(), self.stored_at(successor))
        self.state.mark_stored_rotation(KeyRef(record.client_id, record.replaces or record.key_id),
                                        f"{STORED_SUCCESSOR} {successor.key_id}", when)

    def _copy_from_sinks(self, successor: ApiKey, record: AttemptRecord) -> IssuedKey | None:
        """The successor's secret as a sink holds it, when it is the one this attempt stored (its
        fingerprint) and it authenticates: the missing sinks can then be written from it."""
        for sink in self.sinks:
            try:
                secret = sink.read_secret(successor)
            except RotatorError:
                continue
            if secret is None or (record.fingerprint is not None and self.fingerprint(secret) != record.fingerprint):
                continue
            try:
                if self.keyservice.verify_secret(successor.client_id, secret, key_id=successor.key_id):
                    return IssuedKey(successor, secret)
            except RotatorError:
                return None
        return None

    def _not_made_by(self, successor: ApiKey, record: AttemptRecord) -> str:
        """Why `successor` cannot be the key this attempt's create made, or "". (Dates: the key
        service's against the state store's, with room for their clocks to differ.)"""
        if successor.created_at < record.started_at - CLOCK_ROOM_S:
            return f"created at {utc_iso(successor.created_at)}, before the attempt began"
        last_used = getattr(self.keyservice, "last_used", None)
        if last_used is not None:
            try:
                if last_used(successor.client_id, successor.key_id) is not None:
                    return "it has been used, and nobody had the secret of the key this attempt made"
            except RotatorError as exc:
                return f"cannot tell whether it was used ({exc})"
        return ""

    def _still_lost(self, key: ApiKey, record: AttemptRecord, lease: Any, why: str) -> RotationResult:
        """The fresh reset that replaces a lost secret did not run: the loss stands. The record
        stays, in doubt with the next epoch's key (never sent, so the next sweep past the horizon
        finds it not run and sends it), and a person hears of it each time."""
        epoch = record.epoch + 1
        if epoch >= MAX_EPOCHS:  # beyond what recovery without Redis reads: kept as it is, for a person
            self.emit("rotation.secret_at_risk", key, record, f"{why}; {MAX_EPOCHS} Idempotency-Keys of this "
                                                               "generation are used up, so a person must look")
            return self._result(record.ref, record, "at_risk", f"{why}; the key's live secret is in no sink and "
                                f"{MAX_EPOCHS} Idempotency-Keys of this generation are used up; the record is kept")
        phase = advance(Phase(record.phase), Step.STILL_LOST).to
        self.state.set_epoch(record.ref, record.generation, epoch, lease)
        now = self.state.now()
        record = replace(record, epoch=epoch, phase=phase.value, since=now, doubt_since=record.doubt_since or now,
                         legacy_key=None, derived_with=self._ik_id)
        self.state.save_attempt(record, lease)
        reason = (f"{why}; the key's live secret is still in no sink, so the record is kept and the next sweep "
                  "resets it afresh with the next epoch's key")
        self.emit("rotation.secret_at_risk", key, record, reason)
        return self._result(record.ref, record, "at_risk", reason)

    def _refused(self, record: AttemptRecord, lease: Any) -> None:
        """A conclusive 4xx: the next try of this generation needs a new Idempotency-Key."""
        advance(Phase.IN_DOUBT, Step.REFUSED)
        if record.generation:
            self.state.set_epoch(record.ref, record.generation, record.epoch + 1, lease)
        self.state.delete_attempt(record, lease)

    def _store(self, issued: IssuedKey, record: AttemptRecord, lease: Any, success_event: str,
               prepared: dict[int, object] | None, started: float | None = None,
               before: ApiKey | None = None) -> RotationResult:
        """Write every sink, verify, and only then clear the record."""
        answered_at = self._monotonic()
        started = answered_at if started is None else started
        # Byte-identical for every write of this generation: a name derived from the Idempotency-Key
        # names the attempt, and the key service's reset date is the rotation time.
        secret = SecretRecord(issued.key, issued.secret, public_name(self._key_of(record)),
                              self.fingerprint(issued.secret), float(issued.key.born_at))
        token_check = self._pool.submit(self._check_token, secret) if self.verify else None
        lease.check()
        outcomes = self._write_everywhere(secret, prepared or {})
        stored_at = self._monotonic()
        statuses = {name: status for name, (status, _) in outcomes.items()}
        timings = {"reset_s": round(answered_at - started, 4),
                   "secret_window_s": round(stored_at - answered_at, 6),
                   "slowest_sink_write_s": round(max(d for _, d in outcomes.values()), 6)}
        failed = {name: s for name, s in statuses.items() if s != "ok"}
        failed.update(self._read_back(secret, skip=failed))
        if failed:
            why = "; ".join(f"{k}: {v}" for k, v in failed.items())
            self.emit("rotation.secret_at_risk", issued.key, record, why)  # first: no state write can swallow it
            at_risk = RotationResult(record.client_id, record.key_id, "at_risk",
                                     f"not stored in {len(failed)} of {len(statuses)} sinks ({why}); "
                                     "the attempt is kept and recovery replays it",
                                     record.attempt_id, record.trigger, statuses, timings)
            try:
                self.state.save_attempt(replace(record, phase=advance(Phase.STORING, Step.NOT_STORED).to.value,
                                                issued_generation=str(issued.key.generation),
                                                issued_key_id=issued.key.key_id,
                                                fingerprint=secret.fingerprint), lease)
            except Exception as exc:  # the earlier record (resetting/in doubt) still leads recovery to a replay
                log.error("attempt.update_failed", client_id=record.client_id, key_id=record.key_id,
                          error_type=type(exc).__name__)
            self._history(at_risk)
            return at_risk
        problems = token_check.result() if token_check is not None else []
        self._annotate(secret)
        timings["verify_s"] = round(self._monotonic() - stored_at, 4)
        timings["total_s"] = round(self._monotonic() - started, 4)
        if before is not None and (issued.key.alias, issued.key.scopes) != (before.alias, before.scopes):
            problems.append("the key service changed the key's alias or scopes on reset")
        stale_dates = bool(record.generation) and not issued.key.generation > Generation.parse(record.generation)
        advance(Phase.STORING, Step.STORED)
        if record.generation and not problems and record.action != "create":  # its age may count from it
            self.state.mark_stored_rotation(record.ref, record.generation, self.clock())
        if record.action == "create":  # the grace counts from here: every sink holds the successor
            self._mark_successor_stored(record, issued.key)
        self.state.delete_attempt(record, lease)
        status = "recovered" if success_event == "rotation.recovered" else "succeeded"
        if problems:
            status = "failed"
            self.emit("rotation.failed", issued.key, record, "; ".join(problems))
        else:
            self.emit(success_event, issued.key, record)
        if record.action == "create":
            replaced = record.replaces or record.key_id
            retiring = replace(before or issued.key, key_id=replaced, replaced_by=issued.key.key_id,
                               status="ACTIVE", replaces=None)
            revoke_at = self.retire_at(retiring, issued.key)
            problems.append(f"successor {issued.key.key_id} stored; {replaced} is revoked after "
                            f"{utc_iso(revoke_at)}")
            self.emit("key.retiring", retiring, record, None,
                      {"successor": issued.key.key_id, "revoke_at": utc_iso(revoke_at)})
        if stale_dates:
            why = ("the key service answered the reset but did not move the key's LastResetDate; "
                   "the key's age counts from this rotation, so it is not reset again")
            self.emit("keyservice.protocol_error", issued.key, record, why)
            problems.append(why)
        result = RotationResult(record.client_id, record.key_id, status, "; ".join(problems), record.attempt_id,
                                record.trigger, statuses, timings, generation=record.generation)
        self._history(result)
        return result

    # --- sinks ---------------------------------------------------------------------------------
    def _prepare_sinks(self, key: ApiKey) -> dict[int, object] | str:
        """Every sink must be able to take the write before the key is reset: what each prepared,
        or why one is not ready."""
        prepared: dict[int, object] = {}
        for index, sink in enumerate(self.sinks):
            try:
                prepared[index] = sink.prepare(key)
            except RotatorError as exc:
                return f"{sink.describe(key.ref)} is not ready ({exc})"
            except Exception as exc:
                return f"{sink.describe(key.ref)} is not ready ({type(exc).__name__})"
        return prepared

    def _write_everywhere(self, record: SecretRecord, prepared: dict[int, object]) -> dict[str, tuple[str, float]]:
        """Write every sink at once, each retried on transient errors until the bound.

        One sink is written in this thread: handing it to the pool would only lengthen the time the
        secret is in flight."""
        if len(self.sinks) == 1:
            return {self.sinks[0].describe(record.ref): self._write_one(self.sinks[0], record, prepared.get(0))}
        futures = {sink.describe(record.ref): self._pool.submit(self._write_one, sink, record, prepared.get(i))
                   for i, sink in enumerate(self.sinks)}
        return {name: future.result() for name, future in futures.items()}

    def _write_one(self, sink: SecretSink, record: SecretRecord, prepared: object) -> tuple[str, float]:
        started = self._monotonic()
        deadline = started + self.sink_retry_s
        delay = 0.2
        while True:
            try:
                sink.write(record, prepared)
                return "ok", self._monotonic() - started
            except TransientError as exc:
                if self._monotonic() + delay > deadline:
                    return self._write_failed(sink, record, str(exc)), self._monotonic() - started
                log.info("sink.write_retry", sink=sink.describe(record.ref), error=str(exc))
            except RotatorError as exc:
                return self._write_failed(sink, record, str(exc)), self._monotonic() - started
            except Exception as exc:  # a sink bug must not lose the secret for the other sinks
                log.error("sink.write_crashed", sink=sink.describe(record.ref), error_type=type(exc).__name__)
                return f"failed: {type(exc).__name__}", self._monotonic() - started
            self._sleep(delay * random.uniform(1.0, 1.5))
            delay = min(delay * 2, max(0.5, min(15.0, self.sink_retry_s / 4)))

    def _write_failed(self, sink: SecretSink, record: SecretRecord, error: str) -> str:
        log.warning("sink.write_failed", sink=sink.describe(record.ref), attempt_id=record.attempt_id, error=error)
        return f"failed: {error}"

    def _read_back(self, record: SecretRecord, skip: dict[str, str]) -> dict[str, str]:
        problems = {}
        for sink in self.sinks:
            name = sink.describe(record.ref)
            if name in skip:
                continue
            try:
                stored = sink.read_state(record.key)
            except RotatorError as exc:
                problems[name] = f"read-back failed: {exc}"
                continue
            if stored is None or stored.fingerprint != record.fingerprint:
                problems[name] = "read-back fingerprint differs"
        return problems

    def _annotate(self, record: SecretRecord) -> None:
        for sink in self.sinks:
            try:
                sink.annotate(record)
            except Exception as exc:  # metadata only: the secret is stored and read back
                log.warning("sink.annotate_failed", sink=sink.describe(record.ref), error_type=type(exc).__name__,
                            error=str(exc) if isinstance(exc, RotatorError) else "")

    def _check_token(self, record: SecretRecord) -> list[str]:
        try:
            if not self.keyservice.verify_secret(record.key.client_id, record.secret, key_id=record.key.key_id):
                return ["the new secret does not authenticate"]
        except RotatorError as exc:
            return [f"could not check the new secret: {exc}"]
        return []

    # --- drift and recovery without Redis ------------------------------------------------------
    def _drift_of(self, key: ApiKey, reads: SinkReads | None = None) -> list[Drift]:
        """What each sink lacks; an entry that is not `certain` (a sink that cannot be read, a replay
        that failed) is reported, and blocks a fresh reset, but is never acted on as drift."""
        found, empty, current = [], [], False
        for sink in self.sinks:
            name = sink.describe(key.ref)
            try:
                stored = reads.read(sink, key) if reads is not None else sink.read_state(key)
            except RotatorError as exc:
                found.append(Drift(key, name, f"unreadable ({exc}); drift unknown", certain=False))
                continue
            state = freshness(stored, key)
            if state == "empty":
                empty.append(name)
            elif state == "fresh":
                current = True
            elif state == "stale" and stored is not None and stored.key_reset_at is not None:
                found.append(Drift(key, name, f"stored rotation is from {utc_iso(stored.key_reset_at)}, "
                                              f"key was reset at {utc_iso(key.born_at)}"))
        certain = [d for d in found if d.certain]
        if not empty and len(certain) == len(found):
            return found
        # Whether rotator manages this key at all: a sink holds a secret of it, the history says
        # so, or the reset that produced the current generation was rotator's (its answer is still
        # replayable: Redis may have lost all). Only then are empty or unreadable sinks drift.
        last = self.state.last_rotation(key.ref)
        managed = bool(certain) or current or (last is not None and last.get("status") in ("succeeded", "recovered"))
        lookup = _Lookup()
        recent = self.clock() - (key.last_reset_at if key.last_reset_at is not None else
                                 key.created_at if key.replaces is not None else 0) < REPLAY_LOOKBACK_S
        if not managed and recent:
            lookup = self._replay_lost(key)
            managed = lookup.found is not None
        if managed:
            return found + [Drift(key, name, "no secret stored") for name in empty]
        if lookup.unknown:
            return found + [Drift(key, name, f"maybe no secret stored: {lookup.unknown}", certain=False)
                            for name in empty]
        return []

    def _replay_lost(self, key: ApiKey) -> _Lookup:
        """The stored answer of the reset that produced the key's current generation, found from
        what the sinks say the previous generation was (or the key's creation); `unknown` says why
        it could not be told (a replay failed), which is never read as "not there"."""
        candidates = {Generation(key.created_at, key.created_at)}
        for sink in self.sinks:
            try:
                stored = sink.read_state(key)
            except RotatorError:
                continue
            if stored is not None and stored.key_reset_at is not None and stored.key_reset_at < key.born_at:
                candidates.add(Generation(key.created_at, stored.key_reset_at))
        if key.last_reset_at is None:
            return self._replay_creation(key)
        unknown = ""
        for previous in sorted(candidates, reverse=True):
            for epoch in range(MAX_EPOCHS):
                ik = idempotency_key(self._ik_mac, key.ref, previous, epoch)
                answer = self.keyservice.replay(key.client_id, key.key_id, ik)
                if answer.kind is Replay.ANSWER and answer.issued is not None:
                    if answer.issued.key.generation == key.generation:
                        return _Lookup((answer.issued, _Derived(previous, epoch, "reset")))
                    break
                if answer.kind is Replay.UNKNOWN:
                    unknown = answer.reason or "a replay failed"
                if answer.kind not in (Replay.REFUSED, Replay.SPENT):  # those two led to the next epoch
                    break
            else:
                unknown = unknown or f"{MAX_EPOCHS} refused or spent epochs in a row"
        return _Lookup(unknown=unknown)

    def _replay_creation(self, key: ApiKey) -> _Lookup:
        """A successor never reset: the stored answer of the create that made it (overlap), found
        from its predecessor's generation, which the create's Idempotency-Key names."""
        if key.replaces is None:
            return _Lookup()
        try:
            predecessor = self.keyservice.get_key(key.client_id, key.replaces)
        except RotatorError as exc:
            return _Lookup(unknown=f"cannot read the key it replaces: {exc}")
        for epoch in range(MAX_EPOCHS):
            ik = idempotency_key(self._ik_mac, predecessor.ref, predecessor.generation, epoch, "create")
            answer = self.keyservice.replay_create(key.client_id, predecessor.key_id, ik)
            if answer.kind is Replay.ANSWER and answer.issued is not None:
                if answer.issued.key.key_id == key.key_id and answer.issued.key.generation == key.generation:
                    return _Lookup((answer.issued, _Derived(predecessor.generation, epoch, "create")))
            elif answer.kind is Replay.UNKNOWN:
                return _Lookup(unknown=answer.reason or "a replay failed")
            elif answer.kind is Replay.EMPTY:
                break
        return _Lookup()

    # --- helpers -------------------------------------------------------------------------------
    def _begin(self, note: str, actor: str | None) -> None:
        self._context.note, self._context.actor, self._context.entered = note, actor or self.actor, time.monotonic()

    def _actor(self) -> str:
        return getattr(self._context, "actor", "") or self.actor

    def _get_key(self, ref: KeyRef, trigger: str) -> ApiKey:
        try:
            return self.keyservice.get_key(ref.client_id, ref.key_id)
        except RotatorError as exc:
            result = RotationResult(ref.client_id, ref.key_id, "failed", str(exc), trigger=trigger)
            self._history(result)
            raise _Outcome(result) from None

    def _skipped(self, key: ApiKey, trigger: str, reason: str) -> RotationResult:
        return RotationResult(key.client_id, key.key_id, "skipped", reason, trigger=trigger)

    def _out_of_scope(self, key: ApiKey, trigger: str, scope: str) -> RotationResult:
        """Refused, not skipped: someone asked for this key, and the policy says no."""
        result = RotationResult(key.client_id, key.key_id, "failed",
                                f"{scope}; nothing reset (--force --include-out-of-scope rotates it anyway)",
                                trigger=trigger)
        self._history(result)
        return result

    def _unsettled(self, record: AttemptRecord, reason: str, key: ApiKey | None = None) -> RotationResult:
        status = "at_risk" if record.phase == Phase.STORING.value else "in_doubt"
        began = record.doubt_since or record.since  # sending it again keeps the first doubt
        if self.state.now() - began > STUCK_S:  # a replay that never settles (or a key always blocked) needs a person
            if key is not None:
                self.emit("rotation.secret_at_risk", key, record, f"unsettled for over a day: {reason}")
            else:
                log.error("rotation.stuck", client_id=record.client_id, key_id=record.key_id, reason=reason)
        text = (f"attempt {record.attempt_id} ({record.phase}): {reason}; "
                "the record is kept and nothing is reset until it is settled")
        result = self._result(record.ref, record, status, text)
        log.warning("rotation.unsettled", client_id=record.client_id, key_id=record.key_id, status=status,
                    reason=text)
        return result

    def _result(self, ref: KeyRef, record: AttemptRecord, status: str, reason: str) -> RotationResult:
        result = RotationResult(ref.client_id, ref.key_id, status, reason, record.attempt_id, record.trigger)
        self._history(result)
        return result

    def _failed(self, key: ApiKey, record: AttemptRecord | None, reason: str, status: str = "failed",
                trigger: str = "") -> RotationResult:
        result = RotationResult(key.client_id, key.key_id, status, reason,
                                record.attempt_id if record else None, record.trigger if record else trigger)
        self.emit("rotation.failed", key, record, reason)
        self._history(result)
        return result

    def _history(self, result: RotationResult) -> None:
        call = self._context
        result.note = result.note or getattr(call, "note", "")
        if hasattr(call, "entered"):
            result.timings["engine_s"] = round(time.monotonic() - call.entered, 4)
        try:
            self.state.record({"kind": "rotation", "time": self.clock(), "actor": self._actor(), **result.to_dict()})
        except Exception as exc:  # history is for people; it must not undo a rotation's outcome
            log.error("history.write_failed", error_type=type(exc).__name__)
        log.info("rotation.finished", **{k: v for k, v in result.to_dict().items() if k != "timings"},
                 actor=self._actor())

    def emit(self, name: str, key: ApiKey, attempt: AttemptRecord | None = None, error: str | None = None,
             details: dict[str, Any] | None = None) -> None:
        event = Event(name, SEVERITY[name], key.client_id, key.key_id, key.alias, key.environment.value,
                      round(age_days(key, self.clock()), 2), attempt.attempt_id if attempt else None,
                      sanitize(error), self.clock(), details)
        try:
            self.publisher.publish(event)
        except Exception as exc:  # an alert channel must never break a rotation
            log.error("event.publish_failed", event_name=name, error_type=type(exc).__name__)
