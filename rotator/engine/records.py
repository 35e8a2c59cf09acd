"""The attempt record's own transitions: its Idempotency-Key (derived again, never stored), a
conclusive refusal (next epoch, record cleared) and a refusal that leaves a lost secret lost."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Generation,
    ReplayAnswer,
)
from rotator.engine import report
from rotator.engine.context import Context
from rotator.engine.values import (
    Outcome,
    RotationResult,
)
from rotator.protocol import (
    MAX_EPOCHS,
    Phase,
    Step,
    advance,
    idempotency_key,
)


def key_of(ctx: Context, record: AttemptRecord) -> str:
    """The record's Idempotency-Key, derived again from what the record holds (never stored: it
    reads the live secret). One derived with another secret (a process configured differently,
    or the setting changed while it was in flight) is never sent under a different key: it waits
    for a process that holds that secret."""
    if record.legacy_key:
        return record.legacy_key
    if record.derived_with and record.derived_with != ctx.ik_id:
        raise Outcome(report.unsettled(ctx, record, (
            "its Idempotency-Key was derived with another secret than this process's (engine.idempotency_key_*: "
            "a process configured differently started it, or the setting changed while it was in flight); "
            "settle it where that secret is, or put that secret back")))
    generation = record.generation if record.derived_generation is None else record.derived_generation
    return idempotency_key(ctx.ik_mac, record.key_named, Generation.parse(generation), record.epoch,
                           record.action)


def to_doubt(ctx: Context, record: AttemptRecord, lease: Any) -> AttemptRecord:
    """(resetting, no_answer): the reset may have run. Saved before anything else, so a crash from
    here on finds the record in doubt; the doubt counts from its first moment (`doubt_since`)."""
    now = ctx.state.now()
    record = replace(record, phase=advance(Phase.RESETTING, Step.NO_ANSWER).to.value, since=now,
                     doubt_since=record.doubt_since or now)
    ctx.state.save_attempt(record, lease)
    return record


def used_up(ctx: Context, key: ApiKey, record: AttemptRecord, why: str) -> RotationResult:
    """An attempt that replaces a lost secret has no Idempotency-Key left for its generation: it is
    kept as it is (never cleared: the loss stands) and said loudly on every sweep, until the key
    service forgets the keys that failed (24 h) and the last one can be sent again, or a person acts."""
    used = f"{MAX_EPOCHS} Idempotency-Keys of this generation are used up"
    report.emit(ctx, "rotation.secret_at_risk", key, record, f"{why}; {used}, so a person must look")
    return report.result(ctx, record.ref, record, "at_risk",
                         f"{why}; the key's live secret is in no sink and {used}; the record is kept")


def still_lost(ctx: Context, key: ApiKey, record: AttemptRecord, lease: Any, why: str) -> RotationResult:
    """The fresh reset that replaces a lost secret did not run: the loss stands. The record
    stays, in doubt with the next epoch's key (never sent, so the next sweep past the horizon
    finds it not run and sends it), and a person hears of it each time."""
    epoch = record.epoch + 1
    if epoch >= MAX_EPOCHS:  # beyond what recovery without Redis reads: kept as it is, for a person
        return used_up(ctx, key, record, why)
    phase = advance(Phase(record.phase), Step.STILL_LOST).to
    ctx.state.set_epoch(record.ref, record.generation, epoch, lease)
    now = ctx.state.now()
    record = replace(record, epoch=epoch, phase=phase.value, since=now, doubt_since=record.doubt_since or now,
                     legacy_key=None, derived_with=ctx.ik_id)
    ctx.state.save_attempt(record, lease)
    reason = (f"{why}; the key's live secret is still in no sink, so the record is kept and the next sweep "
              "resets it afresh with the next epoch's key")
    report.emit(ctx, "rotation.secret_at_risk", key, record, reason)
    return report.result(ctx, record.ref, record, "at_risk", reason)


def refused(ctx: Context, record: AttemptRecord, lease: Any) -> None:
    """A conclusive 4xx: the next try of this generation needs a new Idempotency-Key."""
    advance(Phase.IN_DOUBT, Step.REFUSED)
    if record.generation:
        ctx.state.set_epoch(record.ref, record.generation, record.epoch + 1, lease)
    ctx.state.delete_attempt(record, lease)


def replay_of(ctx: Context, record: AttemptRecord) -> ReplayAnswer:
    """The key service's stored answer to the record's call (a reset, or a successor's create)."""
    if record.action == "create":
        return ctx.keyservice.replay_create(record.client_id, record.replaces or record.key_id, key_of(ctx, record))
    return ctx.keyservice.replay(record.client_id, record.key_id, key_of(ctx, record))
