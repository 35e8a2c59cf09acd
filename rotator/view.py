"""The fleet view the workers publish to Redis, for readers that hold nothing else.

`rotator web`, `rotator metrics` and `rotator status` with `view.source = "published"` read this
instead of scanning the key service and reading the sinks: their configuration holds no token, no
sink credential, no fingerprint or signing key, only a Redis user that may read. A compromised
page can then reset nothing. The workers publish it on beat's `view.publish_every_s`: the report
`status --json` prints (with each key's sinks), the key gauges of the metrics, and when.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rotator.domain import KeyRef
from rotator.engine import Engine, grace_start
from rotator.errors import NotFoundError, TransientError
from rotator.fleet import attempt_dict, mentions, status_report
from rotator.scan import ScanRow, scan
from rotator.state import RedisState

#: A metric gauge: its labels and a value (a key's age is published as its birth, so it keeps growing).
Gauge = tuple[list[str], float]


def key_gauges(rows: list[ScanRow], state: RedisState, overlap_grace_s: float,
               delete_after_s: float) -> dict[str, list[Gauge]]:
    """Per key: `born` (age = now - born), `due`, and for a retiring key `revoke` (overlap)."""
    gauges: dict[str, list[Gauge]] = {"born": [], "due": [], "revoke": []}
    successors = {(r.key.client_id, r.key.key_id): r.key for r in rows if r.key.replaces is not None}
    for row in rows:
        labels = [row.key.client_id, row.key.key_id, row.key.environment.value]
        successor = successors.get((row.key.client_id, str(row.key.replaced_by)))
        if row.key.replaced_by is not None and successor is not None:
            grace_end = grace_start(successor, state.stored_rotation(row.key.ref)) + overlap_grace_s
            gauges["revoke"].append((labels, grace_end if row.key.status == "ACTIVE" else grace_end + delete_after_s))
            continue
        if row.state.value == "out_of_scope":
            continue
        gauges["born"].append((labels, float(row.key.born_at)))
        gauges["due"].append((labels, float(row.due_at)))
    return gauges


def publish(engine: Engine, state: RedisState, overlap_grace_s: float, delete_after_s: float,
            ttl_s: int) -> dict[str, Any]:
    """One scan, the report and the gauges from it, stored for `ttl_s` (a view nobody refreshes
    expires rather than showing a fleet that no longer is)."""
    now = time.time()
    rows = list(scan(engine.keyservice, engine.policy, now, engine.clients))
    view = {"published_at": now, "warn_before_days": engine.policy.warn_before_days,
            "report": status_report(engine, now=now, rows=rows)}  # readers take the audit trail from Redis as it is
    gauges = key_gauges(rows, state, overlap_grace_s, delete_after_s)
    state.put_view(json.dumps(view), json.dumps(gauges), now, ttl_s)
    return {"keys": len(rows), "published_at": now}


def gauges(state: RedisState) -> dict[str, list[Gauge]]:
    """The key gauges of the last view; none once it has expired (the workers stopped publishing)."""
    raw = state.view_gauges()
    if raw is None:
        return {"born": [], "due": [], "revoke": []}
    found: dict[str, list[Gauge]] = json.loads(raw)
    return found


def read(state: RedisState) -> dict[str, Any]:
    """The last view the workers published; `TransientError` when there is none (yet, or any more)."""
    raw = state.view()
    if raw is None:
        raise TransientError("the workers have published no fleet view: view.publish_every_s must be above 0 in "
                             "the configuration of beat and the workers (and they must be running)")
    view: dict[str, Any] = json.loads(raw)
    return view


def report(state: RedisState, history: int, view: dict[str, Any] | None = None) -> dict[str, Any]:
    """The published report (of `view`, read when not given), with the audit trail and the rate
    budget as Redis has them now (a spent or paused budget is what may hold the next view back)."""
    from rotator.fleet import rate_budget

    view = read(state) if view is None else view
    result = {**view["report"], "published_at": view["published_at"]}
    result["history"] = state.history(history) if history > 0 else []
    result["rate_budget"] = rate_budget(state)
    return result


def key_report(state: RedisState, ref: KeyRef, history_max: int,
               rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One key's published row (from `rows`, the report already in hand, else the view read now)
    with its own audit trail (newest first), as `fleet.key_report` gives it (each sink's state, not
    its metadata: that stays with the workers)."""
    for row in read(state)["report"]["keys"] if rows is None else rows:
        if row["client_id"] == ref.client_id and row["key_id"] == ref.key_id:
            attempt = state.get_attempt(ref)
            return {**row, "last_rotation": state.last_rotation(ref), "in_flight": attempt.phase if attempt else None,
                    "attempt": attempt_dict(attempt) if attempt else None,
                    "sinks": [{"sink": name, "location": name, "state": value}
                              for name, value in (row.get("sinks") or {}).items()],
                    "history": [e for e in state.history(history_max) if mentions(e, ref)]}
    raise NotFoundError(f"{ref.client_id}/{ref.key_id} is not in the published fleet view")
