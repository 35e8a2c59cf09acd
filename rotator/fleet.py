"""The fleet at a glance: every key with its last rotation, attempt, sinks and strategy, and the
counts an operator looks at first.

`status_report` gives what `rotator status --json` prints and, with `with_sinks`, what `rotator
web` shows, so the two cannot disagree (a test holds them equal). It only reads: the key service,
Redis and each sink's metadata (never a secret, never a fingerprint); whatever publishes the
engine's events decides whether drift is alerted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

from rotator.domain import ApiKey, AttemptRecord, KeyRef, KeyState, utc_iso
from rotator.engine import Drift, Engine, SinkReads, freshness
from rotator.errors import NotFoundError, RotatorError
from rotator.policy import assess, strategy_for
from rotator.protocols import SecretSink
from rotator.scan import ScanRow, scan

#: What a sink holds for a key (`engine.freshness`: fresh, stale, empty, unknown), or that it
#: could not be read.
EMPTY: Final = "empty"
UNREADABLE: Final = "unreadable"
#: Attempt phases, as the cards count them.
IN_FLIGHT_PHASES: Final = ("resetting",)
IN_DOUBT_PHASES: Final = ("in_doubt",)
AT_RISK_PHASES: Final = ("storing",)


def strategy_of(key: ApiKey, engine: Engine) -> str:
    """The rotation strategy of one key (`reset`, or `overlap`): the one place the page and the
    JSON read it from."""
    return strategy_for(key, engine.policy, can_reset=getattr(engine.keyservice, "cannot_reset", None) is None)


def retiring(key: ApiKey, successors: dict[tuple[str, str], ApiKey], engine: Engine) -> dict[str, Any] | None:
    """For a key its successor replaces (the overlap strategy): the successor and when this key is
    revoked (deactivated, or deleted once Inactive, on AWS IAM); None for any other key."""
    if key.replaced_by is None:
        return None
    successor = successors.get((key.client_id, key.replaced_by))
    when = engine.retire_at(key, successor) if successor is not None else None
    return {"successor": key.replaced_by, "revoke_at": utc_iso(when) if when is not None else None,
            "revoke_at_ts": when}


def sink_view(sink: SecretSink, key: ApiKey, reads: SinkReads | None = None) -> dict[str, Any]:
    """One sink's metadata for one key: where, fresh/stale/empty/unreadable, and when it was
    written. Neither the secret nor its fingerprint. With `reads`, a sink already read for this
    view is not read again (the drift check that follows reuses the answer too)."""
    where = {"sink": sink.describe(), "location": sink.describe(key.ref)}
    try:
        stored = (reads or SinkReads()).read(sink, key)
    except RotatorError as exc:
        return {**where, "state": UNREADABLE, "error": str(exc)}
    if stored is None:
        return {**where, "state": EMPTY}
    return {**where, "state": freshness(stored, key), "rotated_at": stored.rotated_at,
            "key_reset_at": stored.key_reset_at, "attempt_id": stored.attempt_id, "version": stored.version}


def attempt_dict(a: AttemptRecord) -> dict[str, Any]:
    return {"client_id": a.client_id, "key_id": a.key_id, "attempt_id": a.attempt_id, "phase": a.phase,
            "trigger": a.trigger}


def drift_dict(d: Drift) -> dict[str, Any]:
    return {"client_id": d.key.client_id, "key_id": d.key.key_id, "sink": d.sink, "reason": d.reason}


def key_row(row: ScanRow, engine: Engine, attempts: dict[str, AttemptRecord], with_sinks: bool,
            reads: SinkReads | None = None,
            successors: dict[tuple[str, str], ApiKey] | None = None) -> dict[str, Any]:
    """One key as `status --json` shows it: its strategy, whether it is retiring (its successor and
    when it is revoked) and, in scope, each sink's state (a retiring key's place holds its
    successor, so it has none)."""
    ref = row.key.ref
    last = engine.state.last_rotation(ref)
    attempt = attempts.get(str(ref))
    out = {**row.to_dict(), "next_due": utc_iso(row.due_at), "last_rotation": last,
           "in_flight": attempt.phase if attempt else None,
           "retiring": retiring(row.key, successors or {}, engine)}
    if with_sinks:
        skip = row.state in (KeyState.OUT_OF_SCOPE, KeyState.RETIRING)
        sinks = [] if skip else [sink_view(s, row.key, reads) for s in engine.sinks]
        out.update(strategy=strategy_of(row.key, engine), sinks={v["sink"]: v["state"] for v in sinks})
    return out


def summary(keys: list[dict[str, Any]], attempts: Iterable[AttemptRecord], drift: list[Drift],
            now: float) -> dict[str, int]:
    """The cards: what needs a look now."""
    in_scope = [k for k in keys if k["state"] != KeyState.OUT_OF_SCOPE.value]
    live = [k for k in in_scope if not k.get("retiring")]  # a retiring key's age no longer matters
    phases = [a.phase for a in attempts]
    return {
        "keys_in_scope": len(in_scope),
        "due_soon": sum(k["state"] == KeyState.DUE_SOON.value for k in in_scope),
        "overdue": sum(k["due_at"] <= now for k in live),
        "in_flight": sum(p in IN_FLIGHT_PHASES for p in phases),
        "in_doubt": sum(p in IN_DOUBT_PHASES for p in phases),
        "at_risk": sum(p in AT_RISK_PHASES for p in phases),
        "failed": sum((k["last_rotation"] or {}).get("status") == "failed" for k in in_scope),
        "drift": len({(d.key.client_id, d.key.key_id) for d in drift}),
        "retiring": sum(bool(k.get("retiring")) for k in in_scope),
    }


def status_report(engine: Engine, *, history: int = 0, now: float | None = None,
                  with_sinks: bool = True, rows: list[ScanRow] | None = None) -> dict[str, Any]:
    """`status --json`: every key (scan row, next due, last rotation, attempt phase), the attempts
    in flight, drift and the last `history` audit entries; with `with_sinks`, also each key's
    strategy and sinks, and a `summary` of the counts.

    The key service is listed once and each sink read once per key: the drift check takes the
    keys the scan listed and the sink states the rows read (`SinkReads`). `rows`: a scan taken
    already (the published view takes one for the report and the metrics)."""
    moment = time.time() if now is None else now
    attempts = {str(a.ref): a for a in engine.state.attempts()}
    if rows is None:
        rows = list(scan(engine.keyservice, engine.policy, moment, engine.clients))
    reads = SinkReads()
    successors = {(r.key.client_id, r.key.key_id): r.key for r in rows if r.key.replaces is not None}
    keys = [key_row(row, engine, attempts, with_sinks, reads, successors) for row in rows]
    # Looking is not reconciling: no alert.
    drift = engine.drift(alert=False, keys=[row.key for row in rows], reads=reads)
    report: dict[str, Any] = {
        "keys": keys,
        "in_flight": [attempt_dict(a) for a in attempts.values()],
        "drift": [drift_dict(d) for d in drift],
        "history": engine.state.history(history) if history > 0 else [],
        "rate_budget": rate_budget(engine.state),
    }
    if with_sinks:
        report["summary"] = summary(keys, attempts.values(), drift, moment)
        report["generated_at"] = moment
    return report


def rate_budget(state: Any) -> list[dict[str, Any]]:
    """The fleet's rate budget per Client ID (rotator.budget), as the state store holds it now."""
    from rotator import budget

    client = getattr(state, "client", None)
    if client is None:  # a state store of another kind keeps no budget
        return []
    return [v.to_dict() for v in budget.views(client, state.ns)]


def mentions(entry: dict[str, Any], ref: KeyRef) -> bool:
    """Whether an audit entry is about this key (a rotation of it, or a manual run that named it)."""
    if entry.get("client_id") == ref.client_id and entry.get("key_id") == ref.key_id:
        return True
    keys = entry.get("keys")
    return isinstance(keys, list) and str(ref) in keys


def key_report(engine: Engine, ref: KeyRef, *, history_max: int = 1000, now: float | None = None) -> dict[str, Any]:
    """One key: its row, its attempt, every sink's metadata and its own audit trail (newest first).
    Raises `NotFoundError` when the key service does not know it, or when it belongs to a Client ID
    outside the configured ones (`keyservice.clients`): the page shows only the keys rotator manages."""
    moment = time.time() if now is None else now
    if engine.clients is not None and ref.client_id not in engine.clients:
        raise NotFoundError(f"{ref.client_id} is not a configured Client ID")
    key = engine.keyservice.get_key(ref.client_id, ref.key_id)
    state, age, due = assess(key, moment, engine.policy)
    row = ScanRow(key, state, age / 86_400, due)
    attempt = engine.state.get_attempt(ref)
    last = engine.state.last_rotation(ref)
    successor = engine.successor(key)
    successors = {(successor.client_id, successor.key_id): successor} if successor is not None else {}
    return {
        **row.to_dict(), "next_due": utc_iso(due), "last_rotation": last,
        "in_flight": attempt.phase if attempt else None, "strategy": strategy_of(key, engine),
        "retiring": retiring(key, successors, engine),
        "attempt": attempt_dict(attempt) if attempt else None,
        "sinks": [sink_view(s, key) for s in engine.sinks],
        "history": [e for e in engine.state.history(history_max) if mentions(e, ref)],
    }
