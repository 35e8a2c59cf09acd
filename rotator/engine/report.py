"""What a rotation tells people: results, the audit history, events, and the warnings of keys
coming due. Every outcome of every step goes out through here."""

from __future__ import annotations

import time
from typing import Any

from rotator import logs
from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Generation,
    KeyRef,
    KeyState,
    utc_iso,
)
from rotator.engine.context import Context
from rotator.engine.values import (
    REPLAY_KEPT_S,
    STUCK_S,
    Outcome,
    RotationResult,
)
from rotator.errors import (
    BudgetSpent,
    RotatorError,
)
from rotator.events import SEVERITY, sanitize
from rotator.policy import (
    age_days,
    classify,
    in_scope,
    is_due,
    scope_problem,
)
from rotator.protocol import (
    Phase,
)
from rotator.protocols import (
    Event,
)
from rotator.scan import every_key

log = logs.get("rotator.engine")


def record_refusal(ctx: Context, ref: KeyRef, reason: str, note: str = "", actor: str | None = None) -> RotationResult:
    """A rotation someone asked for and a plan refused (no such key, out of scope, a shared sink
    place): nothing is sent, and the refusal goes into the audit history."""
    begin(ctx, note, actor)
    result = RotationResult(ref.client_id, ref.key_id, "failed", reason, trigger="manual")
    history(ctx, result)
    return result


def warn(ctx: Context, now: float) -> dict[str, int]:
    """`key.due_soon` for keys in the warning period; `key.overdue` for keys past due and not
    rotated (audit mode, excluded, outside the window, failing)."""
    counts = {"due_soon": 0, "overdue": 0}
    for key in every_key(ctx.keyservice, ctx.clients):
        state = classify(key, now, ctx.policy)
        if state is KeyState.DUE_SOON:
            emit(ctx, "key.due_soon", key)
            counts["due_soon"] += 1
        elif key.replaced_by is None and in_scope(key, ctx.policy) and is_due(key, now, ctx.policy):
            why = scope_problem(key, ctx.policy) or "due and not rotated yet"  # excluded or exempt: why
            emit(ctx, "key.overdue", key, error=why)
            counts["overdue"] += 1
    return counts


def begin(ctx: Context, note: str, actor: str | None, sweep: bool = False) -> None:
    """Who asked and why, for the rotation this thread runs; `sweep`: one of beat's sweeps, whose
    unsettled attempts are told by events and logs, not written to the history on every run."""
    ctx.call.note, ctx.call.actor, ctx.call.entered = note, actor or ctx.actor, time.monotonic()
    ctx.call.sweep = sweep


def actor(ctx: Context) -> str:
    return getattr(ctx.call, "actor", "") or ctx.actor


def get_key(ctx: Context, ref: KeyRef, trigger: str) -> ApiKey:
    try:
        return ctx.keyservice.get_key(ref.client_id, ref.key_id)
    except RotatorError as exc:
        result = RotationResult(ref.client_id, ref.key_id, "failed", str(exc), trigger=trigger)
        history(ctx, result)
        raise Outcome(result) from None


def deferred(ctx: Context, ref: KeyRef, trigger: str, spent: BudgetSpent, key: ApiKey | None = None) -> RotationResult:
    """Held back by the fleet's rate budget before the call went: the next scan or sweep takes it.
    The first rotation held back until that time tells people, once for the fleet
    (`rotation.deferred`); no history entry (a spent budget would fill it with one per key)."""
    reason = f"{spent}; deferred: the next scan or sweep takes it"
    if _first_to_say(ctx, spent):
        event = Event("rotation.deferred", SEVERITY["rotation.deferred"], ref.client_id, ref.key_id,
                      key.alias if key else "", key.environment.value if key else "",
                      round(age_days(key, ctx.clock()), 2) if key else None, None, sanitize(reason), ctx.clock(),
                      {"until": spent.until, "why": spent.why})
        try:
            ctx.publisher.publish(event)
        except Exception as exc:  # an alert channel must never break a rotation
            log.error("event.publish_failed", event_name=event.name, error_type=type(exc).__name__)
    log.info("rotation.deferred", client_id=ref.client_id, key_id=ref.key_id, until=spent.until, why=spent.why)
    return RotationResult(ref.client_id, ref.key_id, "deferred", reason, trigger=trigger,
                          deferred_until=spent.until)


def _first_to_say(ctx: Context, spent: BudgetSpent) -> bool:
    """Whether this rotation is the fleet's first held back until this time (a claim in the state
    store, kept until then); a state store that cannot say: say it."""
    try:
        return bool(ctx.state.once(f"deferred:{spent.client_id}:{int(spent.until)}",
                                   max(1, int(spent.until - ctx.clock()) + 60)))
    except Exception:  # an alert is better twice than never
        return True


def untouched(ctx: Context, key: ApiKey, trigger: str, reason: str) -> RotationResult:
    """What beat's automatic repair leaves to a person: told by its events, logged, and kept out of
    the audit history (a sweep every 15 minutes would fill it with the same line)."""
    log.warning("repair.left", client_id=key.client_id, key_id=key.key_id, reason=reason)
    return RotationResult(key.client_id, key.key_id, "failed", reason, trigger=trigger)


def skipped(ctx: Context, key: ApiKey, trigger: str, reason: str) -> RotationResult:
    return RotationResult(key.client_id, key.key_id, "skipped", reason, trigger=trigger)


def out_of_scope(ctx: Context, key: ApiKey, trigger: str, scope: str) -> RotationResult:
    """Refused, not skipped: someone asked for this key, and the policy says no."""
    result = RotationResult(key.client_id, key.key_id, "failed",
                            f"{scope}; nothing reset (--force --include-out-of-scope rotates it anyway)",
                            trigger=trigger)
    history(ctx, result)
    return result


def unsettled(ctx: Context, record: AttemptRecord, reason: str, key: ApiKey | None = None,
              told: bool = False) -> RotationResult:
    """`told`: the caller raised the critical event itself, in its own words (not twice)."""
    status = "at_risk" if record.phase == Phase.STORING.value else "in_doubt"
    began = record.doubt_since or record.since  # sending it again keeps the first doubt
    if not told and key is not None and secret_issued(record, key):  # on every sweep, with the time left
        emit(ctx, "rotation.secret_at_risk", key, record, f"not settled: {reason}", replay_left(ctx, key))
    elif not told and ctx.state.now() - began > STUCK_S:  # never settles (or a key always blocked): a person
        if key is not None:
            emit(ctx, "rotation.secret_at_risk", key, record, f"unsettled for over a day: {reason}")
        else:
            log.error("rotation.stuck", client_id=record.client_id, key_id=record.key_id, reason=reason)
    text = (f"attempt {record.attempt_id} ({record.phase}): {reason}; "
            "the record is kept and nothing is reset until it is settled")
    if getattr(ctx.call, "sweep", False) and not _first_sweep_today(ctx, record):
        # A sweep runs every 5 or 15 minutes: the history gets this attempt once a day, not every run.
        outcome = RotationResult(record.client_id, record.key_id, status, text, record.attempt_id, record.trigger)
    else:
        outcome = result(ctx, record.ref, record, status, text)
    log.warning("rotation.unsettled", client_id=record.client_id, key_id=record.key_id, status=status,
                reason=text)
    return outcome


def _first_sweep_today(ctx: Context, record: AttemptRecord) -> bool:
    """Whether this sweep is the first in a day to find this attempt unsettled (a claim in the
    state store); a state store that cannot say: yes (a line twice beats none)."""
    try:
        return bool(ctx.state.once(f"unsettled:{record.attempt_id}", STUCK_S))
    except Exception:
        return True


def secret_issued(record: AttemptRecord, key: ApiKey) -> bool:
    """Whether the attempt's secret exists, so that it is at risk while unsettled: its answer was
    had (storing), or the key's generation moved past the one the attempt replaced."""
    if record.phase == Phase.STORING.value:
        return True
    try:
        return bool(record.generation) and key.generation > Generation.parse(record.generation)
    except ValueError:
        return False


def result(ctx: Context, ref: KeyRef, record: AttemptRecord, status: str, reason: str) -> RotationResult:
    result = RotationResult(ref.client_id, ref.key_id, status, reason, record.attempt_id, record.trigger)
    history(ctx, result)
    return result


def failed(ctx: Context, key: ApiKey, record: AttemptRecord | None, reason: str, status: str = "failed",
           trigger: str = "") -> RotationResult:
    result = RotationResult(key.client_id, key.key_id, status, reason,
                            record.attempt_id if record else None, record.trigger if record else trigger)
    emit(ctx, "rotation.failed", key, record, reason)
    history(ctx, result)
    return result


def reloaded(ctx: Context, key: ApiKey, told: dict[str, Any], outcomes: dict[str, str]) -> dict[str, str]:
    """What the reload hooks answered of a stored rotation (`told`): `reload.failed` for each that
    failed, a history entry of its own (the rotation's was written before they ran), and the
    pending mark gone. Returns `outcomes`."""
    for hook, outcome in outcomes.items():
        if outcome != "ok":
            emit(ctx, "reload.failed", key, None, f"{hook}: {outcome.removeprefix('failed: ')}",
                 {"hook": hook, "attempt_id": told.get("attempt_id")})
    try:
        if outcomes:
            ctx.state.record({"kind": "reload", "time": ctx.clock(), "actor": actor(ctx), "client_id": key.client_id,
                              "key_id": key.key_id, "attempt_id": told.get("attempt_id"),
                              "trigger": told.get("trigger", ""),
                              "status": "succeeded" if all(o == "ok" for o in outcomes.values()) else "failed",
                              "reload": dict(outcomes)})
        ctx.state.drop_pending_reload(told)
    except Exception as exc:  # history is for people; it must not undo a rotation's outcome
        log.error("history.write_failed", error_type=type(exc).__name__)
    return outcomes


def history(ctx: Context, result: RotationResult) -> None:
    call = ctx.call
    result.note = result.note or getattr(call, "note", "")
    if hasattr(call, "entered"):
        result.timings["engine_s"] = round(time.monotonic() - call.entered, 4)
    try:
        ctx.state.record({"kind": "rotation", "time": ctx.clock(), "actor": actor(ctx), **result.to_dict()})
    except Exception as exc:  # history is for people; it must not undo a rotation's outcome
        log.error("history.write_failed", error_type=type(exc).__name__)
    log.info("rotation.finished", **{k: v for k, v in result.to_dict().items() if k != "timings"},
             actor=actor(ctx))


def replay_left(ctx: Context, key: ApiKey) -> dict[str, Any]:
    """Until when the key service replays the answer that produced the key's current generation
    (its secret), and how long that leaves: what an at-risk alert tells the person who must act
    before a replay can no longer save the secret (by the key service's own dates)."""
    until = float(key.born_at) + REPLAY_KEPT_S
    return {"replayable_until": utc_iso(until), "time_left_s": max(0, int(until - ctx.clock()))}


def emit(ctx: Context, name: str, key: ApiKey, attempt: AttemptRecord | None = None, error: str | None = None,
         details: dict[str, Any] | None = None) -> None:
    event = Event(name, SEVERITY[name], key.client_id, key.key_id, key.alias, key.environment.value,
                  round(age_days(key, ctx.clock()), 2), attempt.attempt_id if attempt else None,
                  sanitize(error), ctx.clock(), details)
    try:
        ctx.publisher.publish(event)
    except Exception as exc:  # an alert channel must never break a rotation
        log.error("event.publish_failed", event_name=name, error_type=type(exc).__name__)
