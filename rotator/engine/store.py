"""The storing step (`protocol.Phase.STORING`): write every sink, read back, check the token,
and clear the record only then; at risk (record kept) otherwise."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from rotator import logs
from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Generation,
    IssuedKey,
    utc_iso,
)
from rotator.engine import lineage, records, report, sinkio
from rotator.engine.context import Context
from rotator.engine.values import (
    RotationResult,
)
from rotator.protocol import (
    Phase,
    Step,
    advance,
    public_name,
)
from rotator.protocols import (
    SecretRecord,
)

log = logs.get("rotator.engine")


@dataclass
class Written:
    """What the fan-out write left: the stored document, each sink's outcome, the timings so far."""

    secret: SecretRecord
    statuses: dict[str, str]
    timings: dict[str, float]
    started: float
    stored_at: float


def store(ctx: Context, issued: IssuedKey, record: AttemptRecord, lease: Any, success_event: str,
          prepared: dict[int, object] | None, started: float | None = None,
          before: ApiKey | None = None) -> RotationResult:
    """Write every sink, verify, and only then clear the record (`stored`); at risk otherwise."""
    answered_at = ctx.monotonic()
    started = answered_at if started is None else started
    # Byte-identical for every write of this generation: a name derived from the Idempotency-Key
    # names the attempt, and the key service's reset date is the rotation time.
    secret = SecretRecord(issued.key, issued.secret, public_name(records.key_of(ctx, record)),
                          ctx.fingerprint(issued.secret), float(issued.key.born_at))
    token_check = ctx.pool.submit(partial(sinkio.check_token, ctx), secret) if ctx.verify else None
    lease.check()
    outcomes = sinkio.write_everywhere(ctx, secret, prepared or {})
    stored_at = ctx.monotonic()
    written = Written(secret, {name: status for name, (status, _) in outcomes.items()},
                      {"reset_s": round(answered_at - started, 4),
                       "secret_window_s": round(stored_at - answered_at, 6),
                       "slowest_sink_write_s": round(max(d for _, d in outcomes.values()), 6)}, started, stored_at)
    failed = {name: s for name, s in written.statuses.items() if s != "ok"}
    failed.update(sinkio.read_back(ctx, secret, skip=failed))
    if failed:
        return not_stored(ctx, issued, record, lease, written, failed)
    problems = token_check.result() if token_check is not None else []
    return stored(ctx, issued, record, lease, success_event, written, problems, before)


def not_stored(ctx: Context, issued: IssuedKey, record: AttemptRecord, lease: Any, written: Written,
               failed: dict[str, str]) -> RotationResult:
    """(storing, not_stored): the critical event first, then the record kept for recovery's replay."""
    why = "; ".join(f"{k}: {v}" for k, v in failed.items())
    # First: no state write can swallow it. Every sweep that replays and fails again says it again.
    report.emit(ctx, "rotation.secret_at_risk", issued.key, record, why, report.replay_left(ctx, issued.key))
    at_risk = RotationResult(record.client_id, record.key_id, "at_risk",
                             f"not stored in {len(failed)} of {len(written.statuses)} sinks ({why}); "
                             "the attempt is kept and recovery replays it",
                             record.attempt_id, record.trigger, written.statuses, written.timings)
    try:
        ctx.state.save_attempt(replace(record, phase=advance(Phase.STORING, Step.NOT_STORED).to.value,
                                       issued_generation=str(issued.key.generation),
                                       issued_key_id=issued.key.key_id,
                                       fingerprint=written.secret.fingerprint), lease)
    except Exception as exc:  # the earlier record (resetting/in doubt) still leads recovery to a replay
        log.error("attempt.update_failed", client_id=record.client_id, key_id=record.key_id,
                  error_type=type(exc).__name__)
    report.history(ctx, at_risk)
    return at_risk


def stored(ctx: Context, issued: IssuedKey, record: AttemptRecord, lease: Any, success_event: str,
           written: Written, problems: list[str], before: ApiKey | None) -> RotationResult:
    """(storing, stored): every sink reads the fingerprint back; mark, clear the record, then tell."""
    sinkio.annotate(ctx, written.secret)
    timings = written.timings
    timings["verify_s"] = round(ctx.monotonic() - written.stored_at, 4)
    timings["total_s"] = round(ctx.monotonic() - written.started, 4)
    if before is not None and (issued.key.base_alias, issued.key.scopes) != (before.base_alias, before.scopes):
        problems.append("the key service changed the key's alias or scopes on reset")
    stale_dates = bool(record.generation) and not issued.key.generation > Generation.parse(record.generation)
    advance(Phase.STORING, Step.STORED)
    # Its age may count from this rotation: the stored-rotation slot goes with the record's deletion.
    counts = bool(record.generation) and not problems and record.action != "create"
    if record.action == "create":  # the grace counts from here: every sink holds the successor
        lineage.mark_successor_stored(ctx, record, issued.key)
    ctx.state.delete_attempt(record, lease, stored_at=ctx.clock() if counts else None,
                             held=(str(issued.key.generation), sinkio.names(ctx)) if counts else None)
    status = "failed" if problems else "recovered" if success_event == "rotation.recovered" else "succeeded"
    if problems:
        report.emit(ctx, "rotation.failed", issued.key, record, "; ".join(problems))
    else:
        report.emit(ctx, success_event, issued.key, record)
    if record.action == "create":
        problems.append(retiring(ctx, issued, record, before))
    if stale_dates:
        why = ("the key service answered the reset but did not move the key's LastResetDate; "
               "the key's age counts from this rotation, so it is not reset again")
        report.emit(ctx, "keyservice.protocol_error", issued.key, record, why)
        problems.append(why)
    result = RotationResult(record.client_id, record.key_id, status, "; ".join(problems), record.attempt_id,
                            record.trigger, written.statuses, timings, generation=record.generation)
    report.history(ctx, result)  # first: a process that dies in a hook has still said what it stored
    if status != "failed" or record.action != "create":  # a new key found broken: consumers stay on the old
        result.reload = tell_consumers(ctx, issued.key, record)
    return result


def tell_consumers(ctx: Context, key: ApiKey, record: AttemptRecord) -> dict[str, str]:
    """Every sink holds `key`'s new secret: the reload hooks tell its consumers (never the secret),
    and what each answered goes into the history. A hook that fails is `reload.failed`; the
    rotation stands."""
    if ctx.reload is None:
        return {}
    told = {"client_id": key.client_id, "key_id": key.key_id, "alias": key.alias, "base_alias": key.base_alias,
            "environment": key.environment.value, "key_reset_at": key.born_at, "attempt_id": record.attempt_id,
            "replaces": (record.replaces or record.key_id) if record.action == "create" else None,
            "trigger": record.trigger, "stored_at": utc_iso(ctx.clock())}
    try:
        ctx.state.put_pending_reload(told)  # a worker that dies in a hook leaves it to the recovery sweep
    except Exception as exc:  # the hooks still run; only a death meanwhile would go untold
        log.error("reload.not_kept", client_id=key.client_id, key_id=key.key_id, error_type=type(exc).__name__)
    return report.reloaded(ctx, key, told, ctx.reload(told))


def retiring(ctx: Context, issued: IssuedKey, record: AttemptRecord, before: ApiKey | None) -> str:
    """A successor is stored: its predecessor is retiring from now on (`key.retiring`), and when."""
    replaced = record.replaces or record.key_id
    old = replace(before or issued.key, key_id=replaced, replaced_by=issued.key.key_id, status="ACTIVE",
                  replaces=None)
    revoke_at = lineage.retire_at(ctx, old, issued.key)
    report.emit(ctx, "key.retiring", old, record, None,
                {"successor": issued.key.key_id, "revoke_at": utc_iso(revoke_at)})
    return f"successor {issued.key.key_id} stored; {replaced} is revoked after {utc_iso(revoke_at)}"
