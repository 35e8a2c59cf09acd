"""Pure decisions about keys: how old, due or not, excluded, inside the rotation window.

Every function takes `now` (Unix seconds or an aware datetime) instead of reading a clock, so the
same inputs always give the same answer and tests can pin the calendar.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rotator.domain import ApiKey, Environment, KeyRef, KeyState

DAY = 86_400


@dataclass(frozen=True, slots=True)
class Policy:
    max_age_days: int = 90
    warn_before_days: int = 14
    environments: frozenset[Environment] = frozenset({Environment.PRODUCTION})
    exclude: tuple[str, ...] = ()
    strategy: str = "reset"  # "overlap": successor, grace, revoke (docs/strategies.md)
    overlap_grace_s: float = 7 * 86_400

    def __post_init__(self) -> None:
        if self.max_age_days <= 0:
            raise ValueError("max_age_days must be positive")
        if not 0 <= self.warn_before_days < self.max_age_days:
            raise ValueError("warn_before_days must be at least 0 and below max_age_days")


def age_seconds(key: ApiKey, now: float) -> float:
    """Age of the key's current secret: `now - (LastResetDate or CreationDate)`."""
    return now - key.born_at


def age_days(key: ApiKey, now: float) -> float:
    return age_seconds(key, now) / DAY


def due_at(key: ApiKey, policy: Policy) -> int:
    """The Unix second at which the key becomes due."""
    return key.born_at + policy.max_age_days * DAY


def is_due(key: ApiKey, now: float, policy: Policy) -> bool:
    return age_seconds(key, now) >= policy.max_age_days * DAY


def is_due_soon(key: ApiKey, now: float, policy: Policy) -> bool:
    """Inside the warning period but not yet due."""
    warn_from = (policy.max_age_days - policy.warn_before_days) * DAY
    return warn_from <= age_seconds(key, now) < policy.max_age_days * DAY


def is_excluded(ref: KeyRef, patterns: Iterable[str]) -> bool:
    """`client/key` names one key; `client/*` every key of a Client ID."""
    for pattern in patterns:
        client, _, key = pattern.partition("/")
        if client == ref.client_id and key in ("*", ref.key_id):
            return True
    return False


def in_scope(key: ApiKey, policy: Policy) -> bool:
    return key.environment in policy.environments and key.status == "ACTIVE"


def scope_problem(key: ApiKey, policy: Policy) -> str | None:
    """Why the policy leaves this key alone (its environment, its status, an exclusion), or None."""
    if key.environment not in policy.environments:
        return f"out of scope: {key.environment.value} is not in policy.environments"
    if key.status != "ACTIVE":
        return f"out of scope: the key is {key.status}"
    if policy.exclude and is_excluded(key.ref, policy.exclude):
        return "excluded by policy.exclude"
    if key.exempt is not None:
        return f"exempt: {key.exempt}"
    return None


def strategy_for(key: ApiKey, policy: Policy, wanted: str | None = None, *, can_reset: bool = True) -> str:
    """`reset` or `overlap` for this key: the Auto-generated key cannot be revoked, so it is always
    reset; a key service that cannot reset (AWS IAM) always overlaps."""
    if not can_reset:
        return "overlap"
    if key.is_auto_generated:
        return "reset"
    return wanted or policy.strategy


def classify(key: ApiKey, now: float, policy: Policy) -> KeyState:
    """The one state `rotator scan` shows for a key."""
    return assess(key, now, policy)[0]


def assess(key: ApiKey, now: float, policy: Policy) -> tuple[KeyState, float, int]:
    """State, age in seconds and due time of a key, computed once.

    A scan calls this for every key, so it reads each field once instead of going through the
    small helpers above; `classify` and the helpers must keep agreeing with it (tests pin both).
    """
    born = key.last_reset_at if key.last_reset_at is not None else key.created_at
    age = now - born
    max_age = policy.max_age_days * DAY
    if key.replaced_by is not None and key.environment in policy.environments:
        state = KeyState.RETIRING  # Active until its grace ends, then Inactive (IAM) until deleted
    elif key.environment not in policy.environments or key.status != "ACTIVE":
        state = KeyState.OUT_OF_SCOPE
    elif (policy.exclude and is_excluded(key.ref, policy.exclude)) or key.exempt is not None:
        state = KeyState.EXCLUDED
    elif age >= max_age:
        state = KeyState.DUE
    elif age >= max_age - policy.warn_before_days * DAY:
        state = KeyState.DUE_SOON
    else:
        state = KeyState.OK
    return state, age, born + max_age


# --- rotation window -------------------------------------------------------------------------

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW_RE = re.compile(
    r"^\s*(?P<days>[A-Za-z,\-]+)\s+(?P<start>\d{2}:\d{2})-(?P<end>\d{2}:\d{2})\s+(?P<tz>\S+)\s*$"
)


@dataclass(frozen=True, slots=True)
class RotationWindow:
    """Weekdays and wall-clock hours in an IANA zone when rotations may run.

    Written `Mon-Fri 09:00-17:00 Europe/Paris`; the end is exclusive and `24:00` means midnight.
    Wall-clock hours follow daylight-saving changes.
    """

    weekdays: frozenset[int]
    start: time
    end_minutes: int
    zone: ZoneInfo

    @classmethod
    def parse(cls, text: str) -> RotationWindow:
        match = _WINDOW_RE.match(text)
        if not match:
            raise ValueError(
                f"rotation window {text!r} is not of the form 'Mon-Fri 09:00-17:00 Europe/Paris'"
            )
        weekdays = _parse_days(match["days"])
        start_min = _minutes(match["start"])
        end_min = _minutes(match["end"])
        if start_min >= 24 * 60 or not start_min < end_min <= 24 * 60:
            raise ValueError(f"rotation window {text!r}: hours must be HH:MM-HH:MM with start < end")
        try:
            zone = ZoneInfo(match["tz"])
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"rotation window {text!r}: unknown time zone {match['tz']!r}") from None
        return cls(weekdays, time(start_min // 60, start_min % 60), end_min, zone)

    def contains(self, now: datetime) -> bool:
        local = _aware(now).astimezone(self.zone)
        minutes = local.hour * 60 + local.minute
        start_min = self.start.hour * 60 + self.start.minute
        return local.weekday() in self.weekdays and start_min <= minutes < self.end_minutes

    def next_open(self, now: datetime) -> datetime:
        """`now` when inside the window, else the next moment it opens (UTC)."""
        now = _aware(now)
        if self.contains(now):
            return now.astimezone(UTC)
        local_day = now.astimezone(self.zone).date()
        for offset in range(8):
            day = local_day + timedelta(days=offset)
            if day.weekday() not in self.weekdays:
                continue
            # Round-trip through UTC so a start inside a spring-forward gap moves to a real instant.
            opening = datetime.combine(day, self.start, tzinfo=self.zone).astimezone(UTC)
            if opening > now:
                return opening
        raise AssertionError("a window with at least one weekday opens within 8 days")


def _parse_days(spec: str) -> frozenset[int]:
    days: set[int] = set()
    for part in spec.lower().split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"unknown weekday in {spec!r}; use Mon..Sun, ranges and commas")
        a = _DAYS.index(first)
        b = _DAYS.index(last) if last else a
        span = (b - a) % 7
        days.update((a + i) % 7 for i in range(span + 1))
    return frozenset(days)


def _minutes(hhmm: str) -> int:
    hours, minutes = (int(x) for x in hhmm.split(":"))
    if minutes >= 60 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{hhmm!r} is not a time of day")
    return hours * 60 + minutes


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
