"""How the report reads to a person: relative times, next-due colours, the cards. No I/O."""

from __future__ import annotations

from typing import Any

from rotator.domain import utc_iso

DAY = 86_400
WEEK_DAYS = 7
#: (summary key, label, tone when not zero)
CARDS: tuple[tuple[str, str, str], ...] = (
    ("keys_in_scope", "keys in scope", "neutral"),
    ("due_soon", "due soon", "warn"),
    ("overdue", "overdue", "bad"),
    ("in_flight", "in flight", "warn"),
    ("in_doubt", "in doubt", "bad"),
    ("at_risk", "at risk", "bad"),
    ("failed", "last rotation failed", "bad"),
    ("drift", "drift", "bad"),
    ("retiring", "retiring", "neutral"),
)


def iso(ts: float | None) -> str:
    return utc_iso(ts) if ts is not None else ""


def relative(ts: float | None, now: float) -> str:
    """`3 d ago`, `in 5 h`, `now`: the unit a person reads at a glance."""
    if ts is None:
        return ""
    delta = ts - now
    span = abs(delta)
    if span < 60:
        return "now"
    for size, unit in ((DAY, "d"), (3600, "h"), (60, "min")):
        if span >= size:
            amount = f"{span / size:.0f} {unit}"
            break
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def urgency(key: dict[str, Any], now: float, warn_before_days: int) -> str:
    """The next-due colour: overdue, within a week, within the warning period, fine; `none` for a
    key the policy leaves alone."""
    if key["state"] == "out_of_scope":
        return "none"
    left = key["due_at"] - now
    if left <= 0:
        return "overdue"
    if left < WEEK_DAYS * DAY:
        return "week"
    if left < warn_before_days * DAY:
        return "warn"
    return "fine"


#: Results of an attempt that reached the key service: after one, an empty sink is a warning.
_REACHED = ("succeeded", "recovered", "in_doubt", "at_risk")


def sink_tone(state: str, key: dict[str, Any]) -> str:
    """The pill of a sink's state: `idle` (neutral) for an empty sink of a key rotator never reset
    (no attempt in flight, none that reached the key service), else the state itself."""
    last = key.get("last_rotation") or {}
    if state == "empty" and not key.get("in_flight") and not key.get("attempt") and last.get("status") not in _REACHED:
        return "idle"
    return state


def cards(summary: dict[str, int]) -> list[dict[str, Any]]:
    return [{"id": key, "label": label, "value": summary.get(key, 0),
             "tone": tone if summary.get(key, 0) else "quiet"} for key, label, tone in CARDS]


def last_message(last: dict[str, Any] | None) -> str:
    """What the last rotation said: its reason, else the operator's note."""
    if not last:
        return ""
    return str(last.get("reason") or last.get("note") or "")


def entry_keys(entry: dict[str, Any]) -> str:
    if entry.get("client_id"):
        return f"{entry.get('client_id')}/{entry.get('key_id')}"
    keys = entry.get("keys")
    return ", ".join(str(k) for k in keys) if isinstance(keys, list) else ""
