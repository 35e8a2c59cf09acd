"""A rotation under the key's lease: settle what an earlier attempt left, decide whether the key
is due (or retiring), and start the attempt; recovery of every record left behind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

from rotator import logs
from rotator.domain import (
    ApiKey,
    KeyRef,
)
from rotator.engine import attempt, overlap, report
from rotator.engine.context import Context
from rotator.engine.values import (
    LOCKED,
    REPLAY_LOOKBACK_S,
    Outcome,
    RotationResult,
)
from rotator.errors import BudgetSpent, NotFoundError, RotatorError
from rotator.policy import (
    is_due,
    scope_problem,
)
from rotator.state import LeaseLostError

log = logs.get("rotator.engine")


def rotate(ctx: Context, ref: KeyRef, *, trigger: str, force: bool = False, generation: str | None = None,
           reason: str = "", actor: str | None = None, include_out_of_scope: bool = False,
           strategy: str | None = None) -> RotationResult:
    """Rotate one key once, however many triggers fire for it.

    `generation` is the key's generation the trigger saw (`str(key.generation)`): if the key
    has moved on since, this trigger is already served and nothing is reset. A key the policy
    leaves alone (another environment, excluded) is refused, even with `force`, unless
    `include_out_of_scope` says so too. `strategy` overrides the policy's for this run; a key
    that a successor replaces is retired (revoked once its grace is over) instead."""
    report.begin(ctx, reason, actor)
    return leased(ctx, ref, trigger, lambda lease: rotate_locked(
        ctx,         ref, lease, trigger, force, generation, include_out_of_scope, strategy))


def recover_all(ctx: Context) -> list[RotationResult]:
    """Settle every attempt a crash, an outage or a lost answer left behind."""
    report.begin(ctx, "recovery", None, sweep=True)
    # Each is tried, whatever the rate budget held back before: settling an attempt goes past the
    # share (a held one costs a state-store round trip, no call to the key service).
    results = [leased(ctx, pending.ref, pending.trigger, partial(recover_locked, ctx, pending.ref))
               for pending in ctx.state.attempts()]
    if ctx.reload is not None:
        try:
            pending = ctx.state.pending_reloads()
        except Exception as exc:  # the attempts above are what recovery is for; hooks wait for the next sweep
            log.error("reload.pending_unread", error_type=type(exc).__name__)
            pending = []
        for told in pending:
            ref = KeyRef(str(told["client_id"]), str(told["key_id"]))
            leased(ctx, ref, "recovery", partial(reload_left, ctx, told))  # busy: its worker is still telling
    return results


def reload_left(ctx: Context, told: dict[str, Any], lease: Any) -> RotationResult:
    """Reload hooks a worker did not finish telling (it died in one): told again, under the key's
    lease (the worker that rotated it held it while telling), with the same body (a receiver can
    drop the repeat by its `webhook-id`). Anything in the way leaves it for the next sweep."""
    ref = KeyRef(str(told["client_id"]), str(told["key_id"]))
    try:
        key = ctx.keyservice.get_key(ref.client_id, ref.key_id)
    except NotFoundError:  # revoked since: nobody reads its secret any more
        key = None
    except (RotatorError, BudgetSpent) as exc:
        log.warning("reload.pending", client_id=ref.client_id, key_id=ref.key_id, error=str(exc))
        return RotationResult(ref.client_id, ref.key_id, "skipped", "reload hooks pending")
    if key is None or key.born_at != told.get("key_reset_at"):  # gone, or rotated since: told its own
        ctx.state.drop_pending_reload(told)
    elif ctx.reload is not None:
        report.reloaded(ctx, key, told, ctx.reload(told))
    return RotationResult(ref.client_id, ref.key_id, "skipped", "reload hooks told")


def leased(ctx: Context, ref: KeyRef, trigger: str, work: Callable[[Any], RotationResult]) -> RotationResult:
    lease = ctx.state.acquire(f"key:{ref}", ctx.lock_ttl_s)
    if lease is None:
        return RotationResult(ref.client_id, ref.key_id, "busy", LOCKED, trigger=trigger)
    with lease.kept_alive():
        try:
            return work(lease)
        except Outcome as outcome:
            return outcome.result
        except BudgetSpent as spent:  # a call held back before it went; every step before it is crash-safe
            return report.deferred(ctx, ref, trigger, spent)
        except LeaseLostError as exc:
            log.error("rotation.lease_lost", client_id=ref.client_id, key_id=ref.key_id, error=str(exc))
            return RotationResult(ref.client_id, ref.key_id, "busy",
                                  f"{exc}; stopped there, the lease's new holder settles this key", trigger=trigger)


def rotate_locked(ctx: Context, ref: KeyRef, lease: Any, trigger: str, force: bool,
                  generation: str | None, include_out_of_scope: bool = False,
                  strategy: str | None = None) -> RotationResult:
    pending, slot = ctx.state.key_state(ref)
    resumed = False  # an earlier attempt, already allowed, must be finished by a fresh reset
    lost_secret = False  # ... and its secret is lost: the fresh reset replaces it (a create's orphan is revoked)
    if pending is not None:
        settled = attempt.settle(ctx, pending, lease)
        if isinstance(settled, RotationResult):
            return settled
        # Read again (recovery only): no settling path that goes on writes the slot today, but one
        # that did would leave the slot read above stale, and the reset-loop guard below reads it.
        slot = ctx.state.stored_rotation(ref)
        resumed = settled.force
        lost_secret = settled.force and settled.action == "reset"
        force = force or settled.force
        generation = None if settled.force else generation
        strategy = "overlap" if settled.action == "create" else strategy
    key = report.get_key(ctx, ref, trigger)
    if generation is not None and str(key.generation) != generation:
        return report.skipped(ctx, key, trigger, "rotated since the trigger")
    if key.replaced_by is not None:  # a successor holds its place: retire it, never rotate it
        scope = scope_problem(replace(key, status="ACTIVE"), ctx.policy)
        if scope is not None and not include_out_of_scope:
            return report.out_of_scope(ctx, key, trigger, scope)
        return overlap.retire(ctx, key, lease, trigger)
    scope = scope_problem(key, ctx.policy)
    if scope is not None and not include_out_of_scope and not resumed:
        return report.out_of_scope(ctx, key, trigger, scope)
    if not force and not is_due(key, ctx.clock(), ctx.policy):
        return report.skipped(ctx, key, trigger, "not due")
    # Since rotator's last stored reset of this key, did its dates stay where they were (a key
    # service that does not update them, or two resets within one second)?
    unmoved_for = unmoved_since_rotation(ctx, key, slot)
    new_key = False
    if force and unmoved_for is not None and unmoved_for < REPLAY_LOOKBACK_S:
        # A reset now would send that reset's Idempotency-Key and get its answer replayed.
        if generation is not None:  # a message: a rotation has served the dates it saw
            return report.skipped(ctx, key, trigger, "rotated since the trigger (the key's dates did not move)")
        new_key = True  # a person forced it: the next epoch's key
    if not force and unmoved_for is not None and unmoved_for < ctx.policy.max_age_days * 86_400:
        why = ("rotated by rotator, but the key service still shows the reset date it replaced (a protocol "
               "error of the key service); the key's age counts from that rotation, so it is not reset again")
        report.emit(ctx, "keyservice.protocol_error", key, None, why)
        return report.skipped(ctx, key, trigger, why)
    if trigger == "schedule" and ctx.window is not None and not ctx.window.contains(
            datetime.fromtimestamp(ctx.clock(), UTC)):
        return report.skipped(ctx, key, trigger, "outside the rotation window")
    return attempt.reset(ctx, key, lease, trigger, new_key=new_key, strategy=strategy, after_loss=lost_secret)


def unmoved_since_rotation(ctx: Context, key: ApiKey, slot: dict[str, Any] | None) -> float | None:
    """Seconds since rotator stored a rotation that replaced this very generation, which the key
    service still shows (its dates did not move); None when there is none. Within the replay
    window a reset would only replay that rotation; within `max_age_days` the key's age counts
    from it, so there is no reset loop. (The slot is its own: later failures do not overwrite it.)
    `slot` is the key's stored-rotation slot as read under this lease."""
    when = slot.get("time") if slot else None
    if slot is None or slot.get("replaced") != str(key.generation) or not isinstance(when, int | float):
        return None
    return ctx.clock() - when


def recover_locked(ctx: Context, ref: KeyRef, lease: Any) -> RotationResult:
    pending = ctx.state.get_attempt(ref)
    if pending is None:
        return RotationResult(ref.client_id, ref.key_id, "skipped", "settled meanwhile")
    settled = attempt.settle(ctx, pending, lease)
    if isinstance(settled, RotationResult):
        return settled
    if settled.force:
        return attempt.reset(ctx, report.get_key(ctx, ref, "recovery"), lease, "recovery",
                             strategy="overlap" if settled.action == "create" else "reset",
                             after_loss=settled.action == "reset")
    return rotate_locked(ctx, ref, lease, pending.trigger, False, None,
                         strategy="overlap" if pending.action == "create" else None)
