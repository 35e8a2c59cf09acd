"""One attempt at the key service: start it (prepare the sinks, write the record, send the reset
or create), classify the answer (refused, in doubt), and settle an earlier one by replay and the
key's generation (`protocol.judge`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from rotator import logs
from rotator.budget import finishing
from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Generation,
    Replay,
    ReplayAnswer,
)
from rotator.engine import lineage, overlap, records, report, sinkio, store
from rotator.engine.context import Context
from rotator.engine.values import (
    Again,
    RotationResult,
)
from rotator.errors import (
    BudgetSpent,
    InDoubtError,
    NotFoundError,
    RefusedError,
    RotatorError,
    TransientError,
    UnusableAnswerError,
)
from rotator.policy import (
    strategy_for,
)
from rotator.protocol import (
    MAX_EPOCHS,
    Phase,
    ProtocolViolation,
    Step,
    advance,
    deferral,
    judge,
)
from rotator.protocol import refusal as refusal_step

log = logs.get("rotator.engine")


def reset(ctx: Context, key: ApiKey, lease: Any, trigger: str, new_key: bool = False,
          strategy: str | None = None, after_loss: bool = False) -> RotationResult:
    """Reset (or, by the overlap strategy, create the successor) under the generation's
    Idempotency-Key; `new_key`: under the next epoch's (the current one's answer is a rotation
    already stored); `after_loss`: it replaces a secret proved lost, so a refusal does not end it."""
    ref = key.ref
    cannot = getattr(ctx.keyservice, "cannot_reset", None)
    action = "create" if strategy_for(key, ctx.policy, strategy, can_reset=cannot is None) == "overlap" \
        else "reset"
    if action == "create" and key.replaces is not None and cannot is None:
        action = "reset"  # its predecessor still lives: a successor of a successor is refused
    if action == "reset" and cannot is not None:  # nothing is sent, nothing recorded
        return report.failed(ctx, key, None, f"{cannot}; nothing was sent", trigger=trigger)
    if action == "create":
        moving = lineage.places_moving_with_key_id(ctx, key)
        unsendable = lineage.alias_problem(ctx, key)
        if unsendable:
            return report.failed(ctx, key, None, f"overlap: {unsendable}; nothing was created", trigger=trigger)
        if moving:
            field = "{base_alias}" if lineage.by_alias(ctx) else "{alias}"
            return report.failed(ctx, key, None, f"overlap: {moving} names the key id or alias, so consumers would "
                                                 f"not find the new key; use {field} in its path; nothing was "
                                                 "created", trigger=trigger)
    prepared = sinkio.prepare(ctx, key)
    if isinstance(prepared, str):
        return report.failed(ctx, key, None, f"{prepared}; the key was not reset", trigger=trigger)
    generation = str(key.generation)
    epoch, now = ctx.state.epoch_and_now(ref, generation)
    epoch += 1 if new_key else 0
    if epoch >= MAX_EPOCHS:  # beyond what recovery without Redis reads: never sent
        return report.failed(ctx, key, None, f"{MAX_EPOCHS} Idempotency-Keys of this generation are used up (refused, "
                                             "failed or forced); nothing reset. The count expires two days after its "
                                             "last use", trigger=trigger)
    if new_key:
        ctx.state.set_epoch(ref, generation, epoch, lease)
    record = AttemptRecord(ref.client_id, ref.key_id, str(uuid.uuid4()), generation, epoch, trigger, now,
                           advance(Phase.IDLE, Step.START).to.value, now, action=action, derived_with=ctx.ik_id,
                           after_loss=after_loss)
    return send(ctx, key, record, lease, prepared, "rotation.succeeded")


def send_again(ctx: Context, key: ApiKey, record: AttemptRecord, lease: Any, success_event: str,
               step: Step = Step.NOT_RUN) -> RotationResult:
    """Nothing ran within the horizon: send again at once, whatever the due check or the window
    says (the rotation was started). `NOT_RUN`: the same Idempotency-Key (an unused key runs; a
    commit later than any horizon used it, and its 409 leads to that answer). `SPENT`: the key
    is used up by a call that failed, so the next epoch's key. A sink that cannot take the
    answer keeps the record in doubt."""
    prepared = sinkio.prepare(ctx, key)
    if isinstance(prepared, str):
        return report.unsettled(ctx, record, f"the reset did not run so far; {prepared}, so it is sent again "
                                             "once it is", key)
    if step is Step.SPENT:
        epoch = record.epoch + 1
        if epoch >= MAX_EPOCHS and record.after_loss:  # clearing it would forget the lost secret
            return records.used_up(ctx, key, record, "the fresh reset's calls failed (stored 5xx)")
        if epoch >= MAX_EPOCHS:
            records.refused(ctx, record, lease)
            return report.failed(ctx, key, record, f"{MAX_EPOCHS} Idempotency-Keys of this generation are used up "
                                                   "without a reset; nothing reset. The count expires two days after "
                                                   "its last use")
        ctx.state.set_epoch(record.ref, record.generation, epoch, lease)
        record = replace(record, epoch=epoch, legacy_key=None, derived_with=ctx.ik_id)
    record = replace(record, phase=advance(Phase.IN_DOUBT, step).to.value, since=ctx.state.now(),
                     doubt_since=record.doubt_since or record.since)
    return send(ctx, key, record, lease, prepared, success_event)


def send(ctx: Context, key: ApiKey, record: AttemptRecord, lease: Any, prepared: dict[int, object],
         success_event: str) -> RotationResult:
    """Write the record (fenced), check the lease, reset with the record's key, classify the answer."""
    ref = key.ref
    lease.check()
    ctx.state.save_attempt(record, lease)  # durable and fenced before the reset: the hinge
    log.info("rotation.started", client_id=ref.client_id, key_id=ref.key_id, attempt_id=record.attempt_id,
             generation=record.generation, trigger=record.trigger, actor=report.actor(ctx),
             note=getattr(ctx.call, "note", ""))
    started = ctx.monotonic()
    lease.check()  # outside the try: a lost lease is no answer of the key service
    try:
        if record.action == "create":
            issued = ctx.keyservice.create_key(ref.client_id, key.alias, key.scopes, records.key_of(ctx, record),
                                               replaces=key.key_id)
        else:
            issued = ctx.keyservice.reset_key(ref.client_id, ref.key_id, records.key_of(ctx, record))
    except RefusedError as exc:
        return refusal(ctx, key, record, lease, exc)
    except BudgetSpent as spent:
        return held_back(ctx, key, record, lease, spent)
    except (InDoubtError, TransientError) as exc:
        if isinstance(exc, UnusableAnswerError):  # it ran and answered something unusable: loud
            report.emit(ctx, "keyservice.protocol_error", key, record, f"reset answer unusable: {exc}")
        return doubt(ctx, key, record, lease, str(exc))
    except RotatorError as exc:  # anything else the adapter raised: the reset may have run
        return doubt(ctx, key, record, lease, f"{type(exc).__name__}: {exc}")
    advance(Phase.RESETTING, Step.ANSWERED)
    return store.store(ctx, issued, record, lease, success_event, prepared, started, before=key)


def refusal(ctx: Context, key: ApiKey, record: AttemptRecord, lease: Any, exc: RefusedError) -> RotationResult:
    """A 4xx proves that this request did not run, not that its Idempotency-Key never did:
    another actor may have sent the same key (after a Redis restart, say). The key service's
    store decides: a stored refusal burns the key (next epoch); a stored answer is stored;
    nothing stored (a gateway's 4xx) leaves the attempt in doubt."""
    answer = ReplayAnswer(Replay.REFUSED) if exc.stored else records.replay_of(ctx, record)
    if answer.kind is Replay.REFUSED or not getattr(ctx.keyservice, "stores_answers", True):
        if refusal_step(record.after_loss) is Step.STILL_LOST:
            return records.still_lost(ctx, key, record, lease, f"the fresh reset was refused ({exc})")
        records.refused(ctx, record, lease)
        return report.failed(ctx, key, record, f"reset refused, nothing was reset: {exc}")
    return doubt(ctx, key, record, lease, f"reset refused ({exc}), but the key service stored no refusal "
                                          "for its key: another call with it may have run")


def held_back(ctx: Context, key: ApiKey, record: AttemptRecord, lease: Any, spent: BudgetSpent) -> RotationResult:
    """The rate budget held the reset back before it went (`protocol.deferral`): a first attempt
    is dropped and the key deferred; one sent again, or replacing a lost secret, waits in doubt."""
    step = deferral(first=not record.doubt_since and not record.after_loss)
    transition = advance(Phase.RESETTING, step)
    if step is Step.DEFERRED:
        ctx.state.delete_attempt(record, lease)
        return report.deferred(ctx, key.ref, record.trigger, spent, key)
    now = ctx.state.now()
    record = replace(record, phase=transition.to.value, since=now, doubt_since=record.doubt_since or now)
    ctx.state.save_attempt(record, lease)
    if record.after_loss:
        why = f"the fresh reset that replaces a lost secret is held back: {spent}; the record is kept"
        report.emit(ctx, "rotation.secret_at_risk", key, record, why)
        return report.result(ctx, record.ref, record, "at_risk", why)
    return report.deferred(ctx, key.ref, record.trigger, spent, key)


def doubt(ctx: Context, key: ApiKey, record: AttemptRecord, lease: Any, why: str) -> RotationResult:
    """The reset may have run: the record says so durably, then one replay may settle it now."""
    record = records.to_doubt(ctx, record, lease)
    report.emit(ctx, "rotation.in_doubt", key, record, why)
    settled = settle(ctx, record, lease, why, success_event="rotation.succeeded", resend=False)
    if isinstance(settled, RotationResult):
        return settled
    if settled.force:
        return report.failed(ctx, key, record, f"reset failed ({why}) and the key was reset by another since; "
                                               "the next trigger resets it afresh")
    return report.failed(ctx, key, record, f"reset failed ({why}); the stored answer says it did not run")


@dataclass(frozen=True)
class Judged:
    """An earlier attempt as the key service shows it now: the verdict of `protocol.judge`."""

    key: ApiKey
    record: AttemptRecord
    phase: Phase
    step: Step
    replay: ReplayAnswer
    successor: ApiKey | None  # a create's: the successor it made, when one lives


def settle(ctx: Context, record: AttemptRecord, lease: Any, why: str = "", success_event: str = "rotation.recovered",
           resend: bool = True) -> RotationResult | Again:
    """Decide an earlier attempt by replay and the key's generation (protocol.judge), and act on
    the verdict; `resend=False` leaves a not-run attempt for the next sweep to send."""
    with finishing():  # reading the key and replaying settle an attempt already sent: past the share
        judged = judge_attempt(ctx, record, lease, success_event)
    if not isinstance(judged, Judged):
        return judged
    key, record, step, replay = judged.key, judged.record, judged.step, judged.replay
    try:
        advance(judged.phase, step)
    except ProtocolViolation as exc:
        report.emit(ctx, "rotation.secret_at_risk", key, record, f"the key service contradicts itself: {exc}",
                    report.replay_left(ctx, key))
        return report.unsettled(ctx, record, f"protocol violation ({exc}); a person must look", key, told=True)
    if step is Step.ANSWERED and replay.issued is not None:
        return store.store(ctx, replay.issued, record, lease, success_event, prepared=None)
    if step is Step.NO_ANSWER:
        detail = replay.reason or "nothing stored yet"
        return report.unsettled(ctx, record, "; ".join(filter(None, [why, f"replay: {detail}"])), key)
    if step is Step.STILL_LOST:
        return records.still_lost(ctx, key, record, lease, "the fresh reset's stored answer is a refusal")
    if step is Step.REFUSED:
        records.refused(ctx, record, lease)
        log.info("rotation.settled", client_id=key.client_id, key_id=key.key_id, outcome="not run (refused)")
        return Again(force=False, action=record.action)
    if step in (Step.NOT_RUN, Step.SPENT):  # the record is never dropped on this verdict: it is sent again
        again = "the same key" if step is Step.NOT_RUN else "the next epoch's key (the used one failed)"
        log.info("rotation.settled", client_id=key.client_id, key_id=key.key_id, outcome=f"not run; {again} sent")
        if not resend:
            return report.unsettled(ctx, record, f"the reset did not run so far; {again} is sent next", key)
        return send_again(ctx, key, record, lease, success_event, step)
    return lost(ctx, judged, lease)


def judge_attempt(ctx: Context, record: AttemptRecord, lease: Any, success_event: str) -> Judged | RotationResult:
    """Read the key (and a create's successor), replay the record's key, and judge; a record found
    resetting (its actor died mid-call) is in doubt from now on. A result when it cannot be judged."""
    ref = record.ref
    try:
        key = ctx.keyservice.get_key(ref.client_id, ref.key_id)
    except NotFoundError:
        if record.action == "create":  # the replaced key was revoked: its successor may live on
            return overlap.settle_orphaned_create(ctx, record, lease, success_event)
        ctx.state.delete_attempt(record, lease)
        return report.result(ctx, ref, record, "failed", "the key no longer exists; attempt record cleared")
    except RotatorError as exc:
        return report.unsettled(ctx, record, f"cannot read the key: {exc}")
    phase = Phase(record.phase)
    if phase is Phase.RESETTING:
        record = records.to_doubt(ctx, record, lease)
        phase = Phase(record.phase)
    replay = records.replay_of(ctx, record)
    answered = replay.issued.key.generation if replay.issued is not None else None
    replaced = Generation.parse(record.generation) if record.generation else None
    successor, gone = None, False
    if record.action == "create":
        # A create's lineage: its generation is the successor's once one exists. With an answer in
        # hand, that key itself is asked for (a lagging replica may not show the link yet).
        named = replay.issued.key.key_id if replay.kind is Replay.ANSWER and replay.issued else None
        try:
            successor = lineage.successor(ctx, key) if named is None else ctx.keyservice.get_key(ref.client_id, named)
        except NotFoundError:
            gone = True  # the key that answer created is revoked: its secret is dead
        except RotatorError as exc:
            return report.unsettled(ctx, record, f"cannot read the successor: {exc}", key)
    now_generation = successor.generation if successor is not None else key.generation
    step = judge(phase, replaced, now_generation, replay.kind, answered, ctx.state.now() - record.since,
                 ctx.horizon_s, after_loss=record.after_loss)
    if gone:
        step = Step.LOST
    return Judged(key, record, phase, step, replay, successor)


def lost(ctx: Context, judged: Judged, lease: Any) -> RotationResult | Again:
    """(in doubt or storing, lost): the reset ran and its answer cannot be had. Said before any state
    changes; the record stays until the fresh attempt's record replaces it, so a crash before that
    fresh reset leaves this verdict to be reached again, never a key nobody will reset."""
    key, record = judged.key, judged.record
    why_lost = ("the key was reset again after that attempt" if judged.replay.kind is Replay.ANSWER
                else "the reset ran but its answer cannot be replayed")
    if record.action == "create":
        orphan = overlap.drop_orphan(ctx, key, judged.successor, record, lease)
        if orphan is not None:
            return orphan
    report.emit(ctx, "rotation.secret_at_risk", key, record, f"{why_lost}; resetting afresh")
    return Again(force=True, action=record.action)

