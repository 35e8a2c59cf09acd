"""The rotation protocol: never lose the one-time secret.

1. Take the key's lease; recover any earlier attempt first; re-read the key; skip it if not due.
2. Write the attempt record *before* the reset; its id is the reset's Idempotency-Key.
3. Reset, then at once write every sink (bounded in-process retries). The secret lives only in
   this process's memory meanwhile.
4. Verify: the secret authenticates, and every sink reads back its fingerprint.
5. Record history, clear the attempt record, publish the event.

A crash anywhere leaves an attempt record; `recover` replays the reset with the same key (the same
secret comes back) and stores it. Only when replay is impossible is the key reset afresh, with a
critical event. No Celery, HTTP or Redis here: only the protocols.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from rotator import logs
from rotator.domain import ApiKey, AttemptRecord, IssuedKey, KeyRef, KeyState, utc_iso
from rotator.errors import NotFoundError, PermanentError, RotatorError, TransientError, UnansweredError
from rotator.events import SEVERITY, sanitize
from rotator.fingerprint import Fingerprinter
from rotator.policy import Policy, age_days, classify, in_scope, is_due
from rotator.protocols import Event, EventPublisher, KeyService, SecretRecord, SecretSink, StateStore
from rotator.scan import client_ids

log = logs.get("rotator.engine")
LOCKED = "another rotation of this key is running"


@dataclass
class RotationResult:
    """What happened to one key; safe to log, return from a task and store (no secret)."""

    client_id: str
    key_id: str
    status: str  # succeeded | recovered | skipped | failed | at_risk
    reason: str = ""
    attempt_id: str | None = None
    trigger: str = ""
    sinks: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""  # the operator's --reason, kept in the audit history

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "recovered", "skipped")

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "key_id": self.key_id, "status": self.status,
                "reason": self.reason, "attempt_id": self.attempt_id, "trigger": self.trigger,
                "sinks": dict(self.sinks), "timings": dict(self.timings), "note": self.note}


@dataclass
class Drift:
    key: ApiKey
    sink: str
    reason: str


class _Outcome(Exception):
    """Ends a rotation early with a result (used inside the engine only)."""

    def __init__(self, result: RotationResult) -> None:
        self.result = result


class Engine:
    def __init__(
        self, keyservice: KeyService, sinks: list[SecretSink], state: StateStore, publisher: EventPublisher,
        fingerprint: Fingerprinter, policy: Policy, *, sink_retry_s: float = 300.0, verify: bool = True,
        lock_ttl_s: float = 60.0, clock: Callable[[], float] = time.time, actor: str = "",
        clients: list[str] | None = None,
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
        # One thread per sink plus one for the token check, so no sink write waits for a free thread.
        self._pool = ThreadPoolExecutor(max_workers=len(sinks) + 1, thread_name_prefix="sink")
        self._context = threading.local()  # who asked and why, for the rotation running in this thread

    # --- public ------------------------------------------------------------------------------
    def rotate(self, ref: KeyRef, *, trigger: str, force: bool = False,
               triggered_at: float | None = None, reason: str = "", actor: str | None = None) -> RotationResult:
        """Rotate one key once, however many triggers fire for it."""
        self._context.note, self._context.actor, self._context.entered = reason, actor or self.actor, time.monotonic()
        lease = self.state.acquire(f"key:{ref}", self.lock_ttl_s)
        if lease is None:
            return RotationResult(ref.client_id, ref.key_id, "skipped", LOCKED, trigger=trigger)
        with lease.kept_alive():
            try:
                return self._rotate_locked(ref, trigger, force, triggered_at, reason)
            except _Outcome as outcome:
                return outcome.result

    def recover_all(self) -> list[RotationResult]:
        """Finish every attempt a crash or an outage left behind."""
        self._context.note, self._context.actor, self._context.entered = "recovery", self.actor, time.monotonic()
        results = []
        for attempt in self.state.attempts():
            lease = self.state.acquire(f"key:{attempt.ref}", self.lock_ttl_s)
            if lease is None:  # its owner is working on it, or died and its lease has not expired yet
                results.append(RotationResult(attempt.client_id, attempt.key_id, "skipped", LOCKED,
                                              attempt.attempt_id, attempt.trigger))
                continue
            with lease.kept_alive():
                current = self.state.get_attempt(attempt.ref)
                if current is None:
                    continue
                try:
                    results.append(self._recover(current) or RotationResult(
                        current.client_id, current.key_id, "skipped", "the reset never ran; record cleared",
                        attempt_id=current.attempt_id, trigger=current.trigger))
                except _Outcome as outcome:
                    results.append(outcome.result)
        return results

    def due_keys(self, now: float | None = None) -> Iterator[ApiKey]:
        """Due keys in scope, yielded as the pages arrive."""
        moment = self.clock() if now is None else now
        for cid in client_ids(self.keyservice, self.clients):
            for key in self.keyservice.list_keys(cid):
                if classify(key, moment, self.policy) is KeyState.DUE:
                    yield key

    def drift(self) -> list[Drift]:
        """Sinks that hold a secret older than the key's last reset (consumers hold a dead secret)."""
        found = []
        for cid in client_ids(self.keyservice, self.clients):
            for key in self.keyservice.list_keys(cid):
                if not in_scope(key, self.policy):
                    continue
                rotated_by_us = self.state.last_rotation(key.ref) is not None
                for sink in self.sinks:
                    try:
                        stored = sink.read_state(key)
                    except RotatorError as exc:  # unknown is not drift: say so, and do not re-rotate
                        log.warning("drift.unreadable", sink=sink.describe(key.ref), error=str(exc))
                        continue
                    if stored is None:
                        if rotated_by_us:
                            found.append(Drift(key, sink.describe(key.ref), "no secret stored"))
                    elif stored.key_reset_at is not None and stored.key_reset_at < key.born_at:
                        found.append(Drift(key, sink.describe(key.ref),
                                           f"stored rotation is from {utc_iso(stored.key_reset_at)}, "
                                           f"key was reset at {utc_iso(key.born_at)}"))
        for d in found:
            self.emit("drift.detected", d.key, error=f"{d.sink}: {d.reason}")
        return found

    def warn(self, now: float) -> dict[str, int]:
        """`key.due_soon` for keys in the warning period; `key.overdue` for keys past due and not
        rotated (audit mode, excluded, outside the window, failing)."""
        counts = {"due_soon": 0, "overdue": 0}
        for cid in client_ids(self.keyservice, self.clients):
            for key in self.keyservice.list_keys(cid):
                state = classify(key, now, self.policy)
                if state is KeyState.DUE_SOON:
                    self.emit("key.due_soon", key)
                    counts["due_soon"] += 1
                elif in_scope(key, self.policy) and is_due(key, now, self.policy):
                    why = "excluded by policy" if state is KeyState.EXCLUDED else "due and not rotated yet"
                    self.emit("key.overdue", key, error=why)
                    counts["overdue"] += 1
        return counts

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # --- the protocol ------------------------------------------------------------------------
    def _rotate_locked(self, ref: KeyRef, trigger: str, force: bool, triggered_at: float | None,
                       reason: str) -> RotationResult:
        pending = self.state.get_attempt(ref)
        if pending is not None:
            recovered = self._recover(pending)
            if recovered is not None and (recovered.status != "recovered" or not force):
                return recovered
        key = self._call(ref, trigger, None, lambda: self.keyservice.get_key(ref.client_id, ref.key_id))
        if triggered_at is not None and key.last_reset_at is not None and key.last_reset_at >= triggered_at:
            return RotationResult(ref.client_id, ref.key_id, "skipped", "rotated since the trigger", trigger=trigger)
        if not force and not is_due(key, self.clock(), self.policy):
            return RotationResult(ref.client_id, ref.key_id, "skipped", "not due", trigger=trigger)
        attempt = AttemptRecord(ref.client_id, ref.key_id, str(uuid.uuid4()), trigger, self.clock())
        self.state.save_attempt(attempt)  # durable before the reset: the crash-safety hinge
        log.info("rotation.started", client_id=ref.client_id, key_id=ref.key_id, attempt_id=attempt.attempt_id,
                 trigger=trigger, actor=getattr(self._context, "actor", self.actor), note=reason)
        started = time.monotonic()
        try:
            issued = self.keyservice.reset_key(ref.client_id, ref.key_id, attempt.attempt_id)
        except TransientError as exc:
            # The reset may or may not have run: ask for the stored answer before giving up.
            issued = self._replay_after_failed_reset(attempt, key, exc)
        except RotatorError as exc:
            self.state.delete_attempt(attempt)  # refused (4xx): nothing was reset
            return self._failed(key, attempt, f"reset refused: {exc}")
        return self._store_and_verify(key, issued, attempt, started, "rotation.succeeded")

    def _replay_after_failed_reset(self, attempt: AttemptRecord, key: ApiKey, exc: TransientError) -> IssuedKey:
        try:
            issued = self.keyservice.replay(attempt.client_id, attempt.attempt_id)
        except RotatorError:
            # Unknown outcome: the attempt record stays, recovery replays it later.
            raise _Outcome(self._failed(key, attempt, f"reset failed: {exc}; outcome unknown, will replay")) from None
        if issued is None:
            if isinstance(exc, UnansweredError):
                # A request that went unanswered may still commit after this look: the record stays,
                # and recovery clears it once the key shows no reset since the attempt began.
                raise _Outcome(self._failed(key, attempt, f"reset failed: {exc}; not reset so far, will check again"))
            self.state.delete_attempt(attempt)
            raise _Outcome(self._failed(key, attempt, f"reset failed: {exc}; the key was not reset"))
        return issued

    def _store_and_verify(self, before: ApiKey, issued: IssuedKey, attempt: AttemptRecord, started: float,
                          success_event: str) -> RotationResult:
        reset_answered = time.monotonic()
        record = SecretRecord(issued.key, issued.secret, attempt.attempt_id, self.fingerprint(issued.secret),
                              self.clock())
        # The token check needs no sink: it runs while the sinks are written, off the critical path.
        token_check = self._pool.submit(self._check_token, record) if self.verify else None
        outcomes = self._write_everywhere(record)
        stored_at = time.monotonic()
        statuses = {name: status for name, (status, _) in outcomes.items()}
        timings = {"reset_s": round(reset_answered - started, 4),
                   "secret_window_s": round(stored_at - reset_answered, 6),
                   "slowest_sink_write_s": round(max(d for _, d in outcomes.values()), 6)}
        problems = token_check.result() if token_check is not None else []
        failed = {name: s for name, s in statuses.items() if s != "ok"}
        if failed:
            self.state.save_attempt(AttemptRecord(attempt.client_id, attempt.key_id, attempt.attempt_id,
                                                  attempt.trigger, attempt.started_at, "storing", issued.key.born_at))
            result = RotationResult(attempt.client_id, attempt.key_id, "at_risk",
                                    f"not stored in {len(failed)} of {len(statuses)} sinks within "
                                    f"{self.sink_retry_s:g}s; the attempt is kept for recovery",
                                    attempt.attempt_id, attempt.trigger, statuses, timings)
            why = "; ".join(f"{k}: {v}" for k, v in failed.items())
            self.emit("rotation.secret_at_risk", issued.key, attempt, why)
            self._history(result)
            return result
        problems += self._read_back(record)
        timings["verify_s"] = round(time.monotonic() - stored_at, 4)
        timings["total_s"] = round(time.monotonic() - started, 4)
        if (issued.key.alias, issued.key.scopes) != (before.alias, before.scopes):
            problems.append("the key service changed the key's alias or scopes on reset")
        self.state.delete_attempt(attempt)
        if problems:
            result = RotationResult(attempt.client_id, attempt.key_id, "failed", "; ".join(problems),
                                    attempt.attempt_id, attempt.trigger, statuses, timings)
            self.emit("rotation.failed", issued.key, attempt, result.reason)
        else:
            status = "recovered" if success_event == "rotation.recovered" else "succeeded"
            result = RotationResult(attempt.client_id, attempt.key_id, status, "", attempt.attempt_id,
                                    attempt.trigger, statuses, timings)
            self.emit(success_event, issued.key, attempt)
        self._history(result)
        return result

    def _write_everywhere(self, record: SecretRecord) -> dict[str, tuple[str, float]]:
        """Write every sink at once, each retried on transient errors until the bound.

        Returns each sink's status and the time its own write took. One sink is written in this
        thread: handing it to the pool would only lengthen the time the secret is in flight."""
        if len(self.sinks) == 1:
            return {self.sinks[0].describe(record.ref): self._write_one(self.sinks[0], record)}
        futures = {sink.describe(record.ref): self._pool.submit(self._write_one, sink, record) for sink in self.sinks}
        return {name: future.result() for name, future in futures.items()}

    def _write_one(self, sink: SecretSink, record: SecretRecord) -> tuple[str, float]:
        started = time.monotonic()
        status = self._write_with_retries(sink, record)
        return status, time.monotonic() - started

    def _write_with_retries(self, sink: SecretSink, record: SecretRecord) -> str:
        retrying = Retrying(retry=retry_if_exception_type(TransientError), stop=stop_after_delay(self.sink_retry_s),
                            wait=wait_exponential(multiplier=0.2, max=max(0.5, min(15.0, self.sink_retry_s / 4)))
                            + wait_random(0, 0.2),
                            reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    sink.write(record)
        except RotatorError as exc:
            log.warning("sink.write_failed", sink=sink.describe(record.ref), attempt_id=record.attempt_id,
                        error=str(exc))
            return f"failed: {exc}"
        except Exception as exc:  # a sink bug must not lose the secret for the other sinks
            log.error("sink.write_crashed", sink=sink.describe(record.ref), error_type=type(exc).__name__)
            return f"failed: {type(exc).__name__}"
        return "ok"

    def _check_token(self, record: SecretRecord) -> list[str]:
        try:
            if not self.keyservice.verify_secret(record.key.client_id, record.secret):
                return ["the new secret does not authenticate"]
        except RotatorError as exc:
            return [f"could not check the new secret: {exc}"]
        return []

    def _read_back(self, record: SecretRecord) -> list[str]:
        problems = []
        for sink in self.sinks:
            try:
                stored = sink.read_state(record.key)
            except RotatorError as exc:
                problems.append(f"{sink.describe(record.ref)}: read-back failed: {exc}")
                continue
            if stored is None or stored.fingerprint != record.fingerprint:
                problems.append(f"{sink.describe(record.ref)}: read-back fingerprint differs")
        return problems

    def _recover(self, attempt: AttemptRecord) -> RotationResult | None:
        """Finish an earlier attempt by replay; None when there was nothing to finish."""
        log.warning("rotation.recovering", client_id=attempt.client_id, key_id=attempt.key_id,
                    attempt_id=attempt.attempt_id, phase=attempt.phase)
        ref = attempt.ref
        key = self._call(ref, attempt.trigger, attempt, lambda: self.keyservice.get_key(ref.client_id, ref.key_id))
        try:
            issued = self.keyservice.replay(ref.client_id, attempt.attempt_id)
        except RotatorError as exc:
            raise _Outcome(self._failed(key, attempt, f"recovery: replay failed: {exc}")) from None
        if issued is not None and issued.key.born_at == key.born_at:
            return self._store_and_verify(key, issued, attempt, time.monotonic(), "rotation.recovered")
        self.state.delete_attempt(attempt)
        if issued is None and key.born_at < attempt.started_at:
            return None  # the reset never ran
        # The secret of that attempt is gone (replay expired) or dead (reset again since): start afresh.
        why = "replay expired" if issued is None else "the key was reset again after that attempt"
        self.emit("rotation.secret_at_risk", key, attempt, f"recovery: {why}; resetting afresh")
        return self._rotate_locked(ref, "recovery", True, None, why)

    # --- helpers -----------------------------------------------------------------------------
    def _call(self, ref: KeyRef, trigger: str, attempt: AttemptRecord | None, fn: Callable[[], ApiKey]) -> ApiKey:
        try:
            return fn()
        except NotFoundError as exc:
            if attempt is not None:
                self.state.delete_attempt(attempt)
            raise _Outcome(RotationResult(ref.client_id, ref.key_id, "failed", str(exc), trigger=trigger)) from None
        except RotatorError as exc:
            raise _Outcome(RotationResult(ref.client_id, ref.key_id, "failed", str(exc), trigger=trigger)) from None

    def _failed(self, key: ApiKey, attempt: AttemptRecord, reason: str) -> RotationResult:
        result = RotationResult(key.client_id, key.key_id, "failed", reason, attempt.attempt_id, attempt.trigger)
        self.emit("rotation.failed", key, attempt, reason)
        self._history(result)
        return result

    def _history(self, result: RotationResult) -> None:
        call = self._context
        result.note = result.note or getattr(call, "note", "")
        actor = getattr(call, "actor", "") or self.actor
        if hasattr(call, "entered"):
            result.timings["engine_s"] = round(time.monotonic() - call.entered, 4)
        self.state.record({"kind": "rotation", "time": self.clock(), "actor": actor, **result.to_dict()})
        log.info("rotation.finished", **{k: v for k, v in result.to_dict().items() if k != "timings"}, actor=actor)

    def emit(self, name: str, key: ApiKey, attempt: AttemptRecord | None = None, error: str | None = None) -> None:
        event = Event(name, SEVERITY[name], key.client_id, key.key_id, key.alias, key.environment.value,
                      round(age_days(key, self.clock()), 2), attempt.attempt_id if attempt else None,
                      sanitize(error), self.clock())
        try:
            self.publisher.publish(event)
        except Exception as exc:  # an alert channel must never break a rotation
            log.error("event.publish_failed", event_name=name, error_type=type(exc).__name__)
