"""Key service against sinks: drift, orphans, and repair without Redis (replay the reset that
produced the key's generation; reset afresh only when that cannot be had)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from functools import partial
from typing import Any

from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Generation,
    KeyRef,
    Replay,
    utc_iso,
)
from rotator.engine import attempt, flow, report, sinkio, store
from rotator.engine.context import Context
from rotator.engine.values import (
    REPLAY_LOOKBACK_S,
    Derived,
    Drift,
    Lookup,
    Orphan,
    RotationResult,
    SinkReads,
    freshness,
)
from rotator.errors import (
    BudgetSpent,
    RotatorError,
)
from rotator.policy import (
    scope_problem,
)
from rotator.protocol import (
    MAX_EPOCHS,
    Phase,
    idempotency_key,
)
from rotator.scan import every_key


def repair(ctx: Context, fresh: bool = True, recent_only: bool = False) -> tuple[list[Drift], list[RotationResult]]:
    """Settle attempts, then bring every drifted key's sinks up to date by replaying the reset
    that produced its generation (no second reset, even without any state in Redis).

    `fresh`: `reconcile --repair`, a person's command, also resets afresh where no replay can be
    had; every drift is told (`drift.detected`). Beat's automatic repair (`fresh=False`) never
    sends a new reset: what a replay cannot repair is told (`drift.detected`, or
    `rotation.secret_at_risk` with the time left while a replay may still succeed) and waits for
    a person. `recent_only`: the frequent sweep, which reads the sinks only of keys reset within
    the replay lookback (the only ones a replay can repair)."""
    results = flow.recover_all(ctx)
    tried = {KeyRef(r.client_id, r.key_id) for r in results}  # settled (or tried) a moment ago: not twice
    held: list[BudgetSpent] = []  # a Client ID whose rate budget is spent waits; the others go on
    keys: Iterable[ApiKey] = every_key(ctx.keyservice, ctx.clients, held)
    if recent_only:
        keys = (key for key in keys if born_recently(ctx, key))
    try:
        drifted = drift(ctx, alert=fresh, keys=keys)
    except BudgetSpent as spent:  # what was settled so far goes with it, to be said
        raise Stopped(spent, results) from None
    trigger = "reconcile" if fresh else "repair"
    for ref in dict.fromkeys(d.key.ref for d in drifted):  # each tried: a replay goes past the share
        if ref in tried:
            continue
        report.begin(ctx, "reconcile --repair" if fresh else "beat's automatic repair", None, sweep=not fresh)
        results.append(flow.leased(ctx, ref, trigger, partial(repair_locked, ctx, ref, fresh=fresh,
                                                              quiet=recent_only)))
    if held:  # the rest of the fleet was repaired; these Client IDs wait for their budget
        raise Stopped(held[0], results, drifted)
    return drifted, results


def born_recently(ctx: Context, key: ApiKey) -> bool:
    """Reset (or, a successor, created) within the replay lookback: only such a key's current
    secret can be rotator's and still be replayed."""
    since = key.last_reset_at if key.last_reset_at is not None else key.created_at if key.replaces is not None else None
    return since is not None and ctx.clock() - since < REPLAY_LOOKBACK_S


class Stopped(BudgetSpent):
    """A repair stopped by a spent budget part-way, or that skipped a Client ID whose budget is
    spent: `done`, what it settled; `drifted`, what it found."""

    def __init__(self, spent: BudgetSpent, done: list[RotationResult], drifted: list[Drift] | None = None) -> None:
        super().__init__(spent.client_id, spent.until, spent.why)
        self.done = done
        self.drifted = drifted or []


def drift(ctx: Context, alert: bool = True, keys: Iterable[ApiKey] | None = None,
          reads: SinkReads | None = None) -> list[Drift]:
    """Sinks that do not hold the key's current secret (consumers hold a dead one), and keys
    whose current secret rotator issued but no sink holds (found by replay, without Redis).
    `alert=False` for a read-only view (`status`, the status page): it sends no event. A view
    that has listed the keys and read the sinks already passes them (`keys`, `reads`), so
    nothing is listed or read twice."""
    found: list[Drift] = []
    for key in keys if keys is not None else every_key(ctx.keyservice, ctx.clients):
        if key.replaced_by is not None:  # retiring: its place holds its successor
            continue
        if key.replaces is not None and ctx.state.get_attempt(KeyRef(key.client_id, key.replaces)):
            found.extend(Drift(key, s.describe(key.ref), "its predecessor's create is not settled yet",
                               certain=False) for s in ctx.sinks)
        elif scope_problem(key, ctx.policy) is None:  # excluded keys are someone else's to keep
            found.extend(drift_of(ctx, key, reads))
    for d in found if alert else ():
        report.emit(ctx, "drift.detected", d.key, error=f"{d.sink}: {d.reason}")
    return found


def orphans(ctx: Context) -> tuple[list[Orphan], list[tuple[str, str]]]:
    """Entries of sinks that can list what they hold, for keys of the managed Client IDs that
    the key service does not list any more: dead secrets, reported for a person to delete
    (rotator never deletes a stored secret). Also the sinks that could not be listed, and why
    (a role allowed to write its own paths may not list the store)."""
    live = {str(key.ref) for key in every_key(ctx.keyservice, ctx.clients)}
    configured = set(ctx.clients) if ctx.clients is not None else None
    found: list[Orphan] = []
    unchecked: list[tuple[str, str]] = []
    for sink in ctx.sinks:
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


def repair_locked(ctx: Context, ref: KeyRef, lease: Any, fresh: bool = True, quiet: bool = False) -> RotationResult:
    """`quiet` (the frequent sweep): a sink that merely cannot be read is left to the daily
    reconcile to tell."""
    trigger = "reconcile" if fresh else "repair"
    if ctx.state.get_attempt(ref) is not None:
        return flow.recover_locked(ctx, ref, lease)
    key = report.get_key(ctx, ref, trigger)
    seen = drift_of(ctx, key)
    if seen and all(d.unreadable for d in seen) and stored_per_history(ctx, key):  # a read failed, nothing more
        why = f"not repaired: {'; '.join(f'{d.sink}: {d.reason}' for d in seen)}"
        if fresh:
            return report.failed(ctx, key, None, why, trigger=trigger)
        if not quiet:
            told(ctx, seen)
        return report.untouched(ctx, key, trigger, why)
    lookup = replay_lost(ctx, key)
    if lookup.found is not None:
        issued, derived = lookup.found
        now = ctx.state.now()
        created = issued.key.replaces if derived.action == "create" else None  # a successor's create
        record = AttemptRecord(ref.client_id, ref.key_id, str(uuid.uuid4()), "", derived.epoch, trigger, now,
                               Phase.STORING.value, now, str(issued.key.generation), action=derived.action,
                               issued_key_id=issued.key.key_id, replaces=created, derived_with=ctx.ik_id,
                               derived_generation=str(derived.generation))
        ctx.state.save_attempt(record, lease)
        return store.store(ctx, issued, record, lease, "rotation.recovered", prepared=None)
    drifted = seen  # read under this lease a moment ago: not read again
    if not drifted:
        return report.skipped(ctx, key, trigger, "no drift any more")
    doubts = [f"{d.sink}: {d.reason}" for d in drifted if not d.certain]
    doubts += [lookup.unknown] if lookup.unknown else []
    if doubts:  # a replay may still find the secret, or a sink cannot be read: never reset afresh on that
        why = f"not repaired, not reset afresh: {'; '.join(doubts)}"
        if fresh:
            return report.failed(ctx, key, None, why, trigger=trigger)
        if born_recently(ctx, key):  # told again on every sweep, with the time left
            report.emit(ctx, "rotation.secret_at_risk", key, None, why, report.replay_left(ctx, key))
        else:
            told(ctx, drifted)
        return report.untouched(ctx, key, trigger, why)
    scope = scope_problem(key, ctx.policy)
    if scope is not None:  # a key the policy leaves alone is never reset by a repair
        return report.out_of_scope(ctx, key, trigger, scope)
    if not fresh:  # someone reset it outside rotator, or the answer expired: a person decides
        told(ctx, drifted)
        return report.untouched(ctx, key, trigger, "not repaired: no sink holds the key's current secret and no "
                                                   "replay gives it; `rotator reconcile --repair` resets it afresh")
    report.emit(ctx, "rotation.secret_at_risk", key, None,
                "no sink holds the key's current secret and its reset cannot be replayed; resetting afresh")
    return attempt.reset(ctx, key, lease, "reconcile", after_loss=True)


def stored_per_history(ctx: Context, key: ApiKey) -> bool:
    """Whether Redis says a rotation stored the key's current secret (this very generation) in
    every one of today's sinks: a sink that cannot be read then is a read that failed, not a secret
    at risk. Without that word (a wiped Redis, an outside reset, a sink added since, a slot an
    older release wrote) an unreadable sink may be missing it, and the repair goes on."""
    slot = ctx.state.stored_rotation(key.ref)
    return bool(slot and slot.get("generation") == str(key.generation)
                and sorted(slot.get("sinks") or []) == sinkio.names(ctx))


def told(ctx: Context, drifted: list[Drift]) -> None:
    """Drift the automatic repair leaves to a person: `drift.detected` (critical), as the daily
    reconcile always said it."""
    for d in drifted:
        report.emit(ctx, "drift.detected", d.key, error=f"{d.sink}: {d.reason}")


def drift_of(ctx: Context, key: ApiKey, reads: SinkReads | None = None) -> list[Drift]:
    """What each sink lacks; an entry that is not `certain` (a sink that cannot be read, a replay
    that failed) is reported, and blocks a fresh reset, but is never acted on as drift."""
    found, empty, current = [], [], False
    for sink in ctx.sinks:
        name = sink.describe(key.ref)
        try:
            stored = reads.read(sink, key) if reads is not None else sink.read_state(key)
        except RotatorError as exc:
            found.append(Drift(key, name, f"unreadable ({exc}); drift unknown", certain=False, unreadable=True))
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
    last = ctx.state.last_rotation(key.ref)
    managed = bool(certain) or current or (last is not None and last.get("status") in ("succeeded", "recovered"))
    lookup = Lookup()
    if not managed and born_recently(ctx, key):
        lookup = replay_lost(ctx, key)
        managed = lookup.found is not None
    if managed:
        return found + [Drift(key, name, "no secret stored") for name in empty]
    if lookup.unknown:
        return found + [Drift(key, name, f"maybe no secret stored: {lookup.unknown}", certain=False)
                        for name in empty]
    return []


def replay_lost(ctx: Context, key: ApiKey) -> Lookup:
    """The stored answer of the reset that produced the key's current generation, found from
    what the sinks say the previous generation was (or the key's creation); `unknown` says why
    it could not be told (a replay failed), which is never read as "not there"."""
    candidates = {Generation(key.created_at, key.created_at)}
    slot = ctx.state.stored_rotation(key.ref)  # the generation rotator last stored, while Redis has it
    if slot and isinstance(slot.get("generation"), str):
        try:
            stored_last = Generation.parse(slot["generation"])
        except ValueError:
            stored_last = None
        if stored_last is not None and stored_last.born_at < key.born_at:
            candidates.add(stored_last)
    for sink in ctx.sinks:
        try:
            stored = sink.read_state(key)
        except RotatorError:
            continue
        if stored is not None and stored.key_reset_at is not None and stored.key_reset_at < key.born_at:
            candidates.add(Generation(key.created_at, stored.key_reset_at))
    if key.last_reset_at is None:
        return replay_creation(ctx, key)
    unknown = ""
    for previous in sorted(candidates, reverse=True):
        for epoch in range(MAX_EPOCHS):
            ik = idempotency_key(ctx.ik_mac, key.ref, previous, epoch)
            answer = ctx.keyservice.replay(key.client_id, key.key_id, ik)
            if answer.kind is Replay.ANSWER and answer.issued is not None:
                if answer.issued.key.generation == key.generation:
                    return Lookup((answer.issued, Derived(previous, epoch, "reset")))
                break
            if answer.kind is Replay.UNKNOWN:
                unknown = answer.reason or "a replay failed"
            if answer.kind not in (Replay.REFUSED, Replay.SPENT):  # those two led to the next epoch
                break
        else:
            unknown = unknown or f"{MAX_EPOCHS} refused or spent epochs in a row"
    return Lookup(unknown=unknown)


def replay_creation(ctx: Context, key: ApiKey) -> Lookup:
    """A successor never reset: the stored answer of the create that made it (overlap), found
    from its predecessor's generation, which the create's Idempotency-Key names."""
    if key.replaces is None:
        return Lookup()
    try:
        predecessor = ctx.keyservice.get_key(key.client_id, key.replaces)
    except RotatorError as exc:
        return Lookup(unknown=f"cannot read the key it replaces: {exc}")
    for epoch in range(MAX_EPOCHS):
        ik = idempotency_key(ctx.ik_mac, predecessor.ref, predecessor.generation, epoch, "create")
        answer = ctx.keyservice.replay_create(key.client_id, predecessor.key_id, ik)
        if answer.kind is Replay.ANSWER and answer.issued is not None:
            if answer.issued.key.key_id == key.key_id and answer.issued.key.generation == key.generation:
                return Lookup((answer.issued, Derived(predecessor.generation, epoch, "create")))
        elif answer.kind is Replay.UNKNOWN:
            return Lookup(unknown=answer.reason or "a replay failed")
        elif answer.kind is Replay.EMPTY:
            break
    return Lookup()
