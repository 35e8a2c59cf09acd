"""The overlap strategy's reading of a key's lineage: its successor, when the grace starts and
ends, whether every sink holds the successor, and whether a key can be one this attempt made."""

from __future__ import annotations

from dataclasses import replace

from rotator.domain import (
    ApiKey,
    AttemptRecord,
    IssuedKey,
    KeyRef,
    utc_iso,
)
from rotator.engine.context import Context
from rotator.engine.successors import AliasSuccessors
from rotator.engine.values import (
    CLOCK_ROOM_S,
    STORED_SUCCESSOR,
    grace_start,
)
from rotator.errors import (
    NotFoundError,
    RotatorError,
)


def stored_at(ctx: Context, successor: ApiKey) -> float:
    """When consumers could first read the successor: its creation at the key service, or later
    when rotator recorded that every sink held it (a sink that was down gets the whole grace
    too). Without that record (Redis lost), the creation date."""
    replaced = successor.replaces
    slot = ctx.state.stored_rotation(KeyRef(successor.client_id, replaced)) if replaced else None
    return grace_start(successor, slot)


def retire_at(ctx: Context, key: ApiKey, successor: ApiKey) -> float:
    """When a retiring key's next step is due: revoked (or deactivated) after the grace, and an
    already deactivated one deleted `delete_after_s` later."""
    revoke_at = stored_at(ctx, successor) + ctx.policy.overlap_grace_s
    if key.status == "ACTIVE":
        return revoke_at
    return revoke_at + float(getattr(ctx.keyservice, "delete_after_s", 0.0))


def successor_problem(ctx: Context, successor: ApiKey) -> str | None:
    """Why the successor is not yet what every consumer reads, or None: every sink's document is
    the successor's own, with one fingerprint, and the stored secret authenticates."""
    fingerprints = set()
    for sink in ctx.sinks:
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
        secret = ctx.sinks[0].read_secret(successor)
    except RotatorError as exc:
        return f"{ctx.sinks[0].describe(successor.ref)} cannot be read ({exc})"
    if secret is None or ctx.fingerprint(secret) not in fingerprints:
        return "the stored secret changed while it was checked"
    try:
        if not ctx.keyservice.verify_secret(successor.client_id, secret, key_id=successor.key_id):
            return f"the stored secret of successor {successor.key_id} does not authenticate"
    except RotatorError as exc:
        return f"could not check the successor's secret: {exc}"
    return None


def successor(ctx: Context, key: ApiKey) -> ApiKey | None:
    """The key that replaces `key`, as the key service shows it now (None: none, or revoked)."""
    if key.replaced_by is None:
        return None
    try:
        successor = ctx.keyservice.get_key(key.client_id, key.replaced_by)
    except NotFoundError:
        return None
    # Only a key that names this one as the key it replaces, with its (base) alias, is its successor (a
    # key service that links an unrelated key must not get that key revoked, or this one).
    if successor.replaces != key.key_id or successor.base_alias != key.base_alias:
        return None
    return successor


def holders(ctx: Context, key: ApiKey) -> tuple[list[str], list[str]]:
    """The sinks whose document is `key`'s own, and those that cannot be read."""
    holding, unreadable = [], []
    for sink in ctx.sinks:
        try:
            stored = sink.read_state(key)
        except RotatorError as exc:
            unreadable.append(f"{sink.describe(key.ref)}: {exc}")
            continue
        if stored is not None and stored.key_id == key.key_id and stored.key_reset_at == key.born_at:
            holding.append(sink.describe(key.ref))
    return holding, unreadable


def by_alias(ctx: Context) -> bool:
    """The overlap strategy's alias-template mode: the new key has an alias of its own."""
    return isinstance(ctx.keyservice, AliasSuccessors)


def alias_problem(ctx: Context, key: ApiKey) -> str | None:
    """In the alias-template mode, why the lineage's next alias could not be sent; else None."""
    return ctx.keyservice.alias_problem(key) if isinstance(ctx.keyservice, AliasSuccessors) else None


def places_moving_with_key_id(ctx: Context, key: ApiKey) -> str:
    """The sinks whose place for a key changes with its id (or, in the alias-template mode, with
    its alias: the new key's differs), as a printable list; "" when there is none. The overlap
    strategy needs one that stays put."""
    moving = []
    for sink in ctx.sinks:
        other = key.key_id[:-1] + ("1" if key.key_id[-1:] == "0" else "0")  # a valid id of the same length
        try:
            here = sink.location(key)
        except RotatorError:
            continue  # an id no path may be built from: prepare refuses it
        renamed = f"{key.alias}-x" if by_alias(ctx) else key.alias
        try:
            moved = sink.location(replace(key, key_id=other, alias=renamed, lineage_base=key.base_alias)) != here
        except RotatorError:
            moved = True  # cannot tell: refuse
        if moved:
            moving.append(sink.describe())
    return ", ".join(moving)


def mark_successor_stored(ctx: Context, record: AttemptRecord, successor: ApiKey) -> None:
    """Every sink holds the successor from now on: its grace starts here (only ever later, so a
    sink written late, or found holding it by a later settle, gives its consumers the whole grace)."""
    when = max(ctx.clock(), stored_at(ctx, successor))
    ctx.state.mark_stored_rotation(KeyRef(record.client_id, record.replaces or record.key_id),
                                   f"{STORED_SUCCESSOR} {successor.key_id}", when)


def copy_from_sinks(ctx: Context, successor: ApiKey, record: AttemptRecord) -> IssuedKey | None:
    """The successor's secret as a sink holds it, when it is the one this attempt stored (its
    fingerprint) and it authenticates: the missing sinks can then be written from it."""
    for sink in ctx.sinks:
        try:
            secret = sink.read_secret(successor)
        except RotatorError:
            continue
        if secret is None or (record.fingerprint is not None and ctx.fingerprint(secret) != record.fingerprint):
            continue
        try:
            if ctx.keyservice.verify_secret(successor.client_id, secret, key_id=successor.key_id):
                return IssuedKey(successor, secret)
        except RotatorError:
            return None
    return None


def not_made_by(ctx: Context, successor: ApiKey, record: AttemptRecord) -> str:
    """Why `successor` cannot be the key this attempt's create made, or "". (Dates: the key
    service's against the state store's, with room for their clocks to differ.)"""
    if successor.created_at < record.started_at - CLOCK_ROOM_S:
        return f"created at {utc_iso(successor.created_at)}, before the attempt began"
    last_used = getattr(ctx.keyservice, "last_used", None)
    if last_used is not None:
        try:
            if last_used(successor.client_id, successor.key_id) is not None:
                return "it has been used, and nobody had the secret of the key this attempt made"
        except RotatorError as exc:
            return f"cannot tell whether it was used ({exc})"
    return ""
