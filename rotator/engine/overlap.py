"""The overlap strategy's ends: retiring the replaced key after the grace, and settling a create
whose answer is gone (its successor finished from the sinks, or revoked as an orphan)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rotator import logs
from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Replay,
    utc_iso,
)
from rotator.engine import lineage, records, report, store
from rotator.engine.context import Context
from rotator.engine.values import (
    IN_USE_WINDOW_S,
    RotationResult,
)
from rotator.errors import (
    NotFoundError,
    RotatorError,
)

log = logs.get("rotator.engine")


def retire(ctx: Context, key: ApiKey, lease: Any, trigger: str) -> RotationResult:
    """Revoke a key its successor replaces, once the grace is over (`--force` does not shorten
    it: a second forced run must not cut consumers off), and only while every sink holds the
    successor and its stored secret authenticates. A key service with a deactivation step (AWS
    IAM) deactivates first, refuses a key still in use since its successor was stored, and
    deletes `delete_after_s` later. Everything here is derived from the key service and the
    sinks: a crash anywhere is finished by the next run."""
    try:
        successor = lineage.successor(ctx, key)
    except RotatorError as exc:
        return report.failed(ctx, key, None, f"not revoked: cannot read its successor ({exc})", trigger=trigger)
    if successor is None:
        return report.skipped(ctx, key, trigger, f"its successor {key.replaced_by} is gone; nothing revoked")
    two_stage = hasattr(ctx.keyservice, "deactivate_key")
    deactivate = two_stage and key.status == "ACTIVE"
    when = lineage.retire_at(ctx, key, successor)
    if ctx.clock() < when:
        verb = "deleted" if key.status != "ACTIVE" else "deactivated" if two_stage else "revoked"
        return report.skipped(ctx, key, trigger, f"retiring: {verb} after {utc_iso(when)} "
                                                 f"(successor {successor.key_id})")
    problem = lineage.successor_problem(ctx, successor)
    if problem is not None:
        return report.failed(ctx, key, None, f"not revoked: {problem}", trigger=trigger)
    if deactivate:
        try:
            used = ctx.keyservice.last_used(key.client_id, key.key_id)  # type: ignore[attr-defined]
        except RotatorError as exc:
            return report.failed(ctx, key, None, f"not deactivated: cannot read its last use ({exc})", trigger=trigger)
        recent = ctx.clock() - min(IN_USE_WINDOW_S, ctx.policy.overlap_grace_s / 2)
        if used is not None and used.when > max(successor.created_at, recent):
            why = (f"used at {utc_iso(used.when)} ({used.service}, {used.region}), after its successor "
                   f"{successor.key_id} was stored and within the last "
                   f"{min(IN_USE_WINDOW_S, ctx.policy.overlap_grace_s / 2) / 3600:g} h; not deactivated")
            report.emit(ctx, "key.still_in_use", key, None, why,
                        {"service": used.service, "region": used.region, "last_used": utc_iso(used.when)})
            result = RotationResult(key.client_id, key.key_id, "failed", why, trigger=trigger)
            report.history(ctx, result)
            return result
    lease.check()
    try:
        if deactivate:
            ctx.keyservice.deactivate_key(key.client_id, key.key_id)  # type: ignore[attr-defined]
        else:
            ctx.keyservice.revoke_key(key.client_id, key.key_id)
    except NotFoundError:
        return report.skipped(ctx, key, trigger, "revoked already")
    except RotatorError as exc:
        return report.failed(ctx, key, None, f"revoking failed: {exc}", trigger=trigger)
    event, verb = ("key.deactivated", "deactivated") if deactivate else ("key.revoked", "revoked")
    report.emit(ctx, event, key, None, None, {"successor": successor.key_id})
    result = RotationResult(key.client_id, key.key_id, "succeeded",
                            f"{verb}; replaced by {successor.key_id}", trigger=trigger,
                            generation=str(key.generation))
    report.history(ctx, result)
    return result


def drop_orphan(ctx: Context, key: ApiKey, successor: ApiKey | None, record: AttemptRecord,
                lease: Any) -> RotationResult | None:
    """A create ran and its answer is gone: the successor it made is a key nobody holds the secret
    of. Revoke it (it would block a new successor, and IAM's two-key limit) and burn the
    epoch, so the next create is a new call; never when a sink holds it or cannot be read, and
    never a key this attempt cannot have made (older than the attempt, or already used: nobody
    had its secret), which is someone else's: then this create did not run."""
    if successor is None and record.issued_key_id:  # the answer came once: that key, if it lives
        try:
            successor = ctx.keyservice.get_key(key.client_id, record.issued_key_id)
        except NotFoundError:
            successor = None
        except RotatorError as exc:
            return report.unsettled(ctx, record, f"cannot read the successor: {exc}", key)
    if successor is not None and successor.key_id != record.issued_key_id:
        foreign = lineage.not_made_by(ctx, successor, record)
        if foreign:
            records.refused(ctx, record, lease)
            return report.failed(ctx, key, record, f"successor {successor.key_id} was not made by this rotation "
                                                   f"({foreign}); nothing revoked, nothing created")
    if successor is not None:
        holding, unreadable = lineage.holders(ctx, successor)
        finished = finish_from_sinks(ctx, successor, record, lease, holding, unreadable)
        if finished is not None:
            return finished
        if holding or unreadable:
            why = "; ".join([f"{h} holds it" for h in holding] + unreadable)
            return report.unsettled(ctx, record, f"the create's answer is gone but successor {successor.key_id} "
                                                 f"may be held ({why}); a person must decide", key)
        lease.check()
        try:
            ctx.keyservice.revoke_key(key.client_id, successor.key_id)
        except NotFoundError:
            pass
        except RotatorError as exc:
            return report.unsettled(ctx, record, f"cannot revoke successor {successor.key_id}, whose secret nobody "
                                                 f"holds: {exc}", key)
        log.warning("rotation.orphan_revoked", client_id=key.client_id, key_id=key.key_id,
                    successor=successor.key_id)
    # Nothing is outstanding any more: the next create is a new call under the next epoch (the
    # old key would replay the dead answer), and the key, still due, is created again.
    if record.generation:
        ctx.state.set_epoch(record.ref, record.generation, record.epoch + 1, lease)
    ctx.state.delete_attempt(record, lease)
    return None


def settle_orphaned_create(ctx: Context, record: AttemptRecord, lease: Any, success_event: str) -> RotationResult:
    """A create whose replaced key was revoked meanwhile (by a person): its successor still
    lives, so its secret is still owed to the sinks, from the create's answer or, once that is
    gone, from a sink that holds it. The record ends only once the successor is stored, or is
    proved gone; anything unsure keeps it."""
    ref = record.ref
    answer = records.replay_of(ctx, record)
    if answer.kind is Replay.UNKNOWN:
        return report.unsettled(ctx, record, f"the replaced key is gone; replay: {answer.reason}")
    named = answer.issued.key.key_id if answer.kind is Replay.ANSWER and answer.issued else record.issued_key_id
    if named is None:  # no answer ever came and none is stored: no key to finish
        ctx.state.delete_attempt(record, lease)
        return report.result(ctx, ref, record, "failed", "the replaced key no longer exists and no successor was "
                                                         "answered; attempt record cleared")
    try:
        successor = ctx.keyservice.get_key(ref.client_id, named)
    except NotFoundError:
        ctx.state.delete_attempt(record, lease)
        return report.result(ctx, ref, record, "failed", f"the replaced key and its successor {named} are both gone; "
                                                         "attempt record cleared")
    except RotatorError as exc:
        return report.unsettled(ctx, record, f"the replaced key is gone; cannot read successor {named}: {exc}")
    # The record proves what the revoke erased from the key service: the successor replaced that key,
    # whose document a sink may still hold.
    successor = replace(successor, replaces=successor.replaces or record.replaces or record.key_id)
    if answer.kind is Replay.ANSWER and answer.issued is not None and \
            successor.generation == answer.issued.key.generation:
        return store.store(ctx, answer.issued, record, lease, success_event, prepared=None)
    finished = finish_from_sinks(ctx, successor, record, lease, *lineage.holders(ctx, successor))
    if finished is not None:
        return finished
    report.emit(ctx, "rotation.secret_at_risk", successor, record,
                "its replaced key was revoked and its secret is not in every sink", report.replay_left(ctx, successor))
    return report.unsettled(ctx, record, f"the replaced key is gone and successor {named} is not in every sink",
                            successor, told=True)


def finish_from_sinks(ctx: Context, successor: ApiKey, record: AttemptRecord, lease: Any, holding: list[str],
                      unreadable: list[str]) -> RotationResult | None:
    """With no answer to replay: nothing is owed when every sink holds the successor's current
    secret; when some do, the others are written from them (IAM keeps no answers). None: neither."""
    if len(holding) == len(ctx.sinks):
        lineage.mark_successor_stored(ctx, record, successor)  # the grace counts from no earlier than now
        ctx.state.delete_attempt(record, lease)
        return report.result(ctx, record.ref, record, "skipped", f"settled: successor {successor.key_id}'s "
                                                                 "current secret is in every sink")
    if holding and not unreadable:
        copied = lineage.copy_from_sinks(ctx, successor, record)
        if copied is not None:
            return store.store(ctx, copied, record, lease, "rotation.recovered", prepared=None)
    return None
