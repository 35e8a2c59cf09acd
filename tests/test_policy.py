"""Policy decisions on their boundaries, with the calendar pinned by freezegun."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from freezegun import freeze_time

from rotator.domain import ApiKey, Environment, KeyRef, KeyState
from rotator.policy import (
    DAY,
    Policy,
    RotationWindow,
    age_days,
    classify,
    is_due,
    is_due_soon,
    is_excluded,
)

POLICY = Policy(max_age_days=90, warn_before_days=14)


def key(created: float, reset: float | None = None, env: Environment = Environment.PRODUCTION,
        key_id: str = "k1", status: str = "ACTIVE") -> ApiKey:
    return ApiKey("acme", key_id, "alias", env, (), int(created),
                  None if reset is None else int(reset), status=status)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_due_exactly_at_max_age_not_a_minute_before() -> None:
    """A key is due at age >= 90 d exactly; at 89 d 23 h 59 m it is only due soon."""
    created = ts("2026-01-01T00:00:00")
    with freeze_time("2026-03-31T23:59:00"):  # 89 d 23 h 59 m later
        assert not is_due(key(created), time.time(), POLICY)
        assert classify(key(created), time.time(), POLICY) is KeyState.DUE_SOON
    with freeze_time("2026-04-01T00:00:00"):  # 90 d exactly
        assert is_due(key(created), time.time(), POLICY)
        assert classify(key(created), time.time(), POLICY) is KeyState.DUE


def test_leap_day_counts_as_a_day() -> None:
    """Age is counted in real days, so 29 Feb 2028 shifts the due date by one calendar day."""
    created = ts("2028-01-01T00:00:00")
    with freeze_time("2028-03-30T23:00:00"):  # 89 d 23 h with the leap day
        assert not is_due(key(created), time.time(), POLICY)
    with freeze_time("2028-03-31T00:00:00"):
        assert is_due(key(created), time.time(), POLICY)


def test_recent_reset_resets_the_age_of_an_old_key() -> None:
    """A key created years ago but reset yesterday is young."""
    with freeze_time("2026-06-01T12:00:00"):
        now = time.time()
        old = key(now - 3 * 365 * DAY, reset=now - DAY)
        assert age_days(old, now) == pytest.approx(1.0)
        assert classify(old, now, POLICY) is KeyState.OK


def test_due_soon_starts_warn_before_days_ahead() -> None:
    """Due soon from max_age - warn_before days until due."""
    now = ts("2026-06-01T00:00:00")
    assert not is_due_soon(key(now - 76 * DAY + 1), now, POLICY)
    assert is_due_soon(key(now - 76 * DAY), now, POLICY)
    assert is_due_soon(key(now - 90 * DAY + 1), now, POLICY)
    assert not is_due_soon(key(now - 90 * DAY), now, POLICY)


def test_out_of_scope_and_excluded() -> None:
    """Sandbox and revoked keys are out of scope; exclusions name one key or a whole client."""
    now = ts("2026-06-01T00:00:00")
    old = now - 200 * DAY
    assert classify(key(old, env=Environment.SANDBOX), now, POLICY) is KeyState.OUT_OF_SCOPE
    assert classify(key(old, status="REVOKED"), now, POLICY) is KeyState.OUT_OF_SCOPE
    excluded = Policy(exclude=("acme/k1",))
    assert classify(key(old), now, excluded) is KeyState.EXCLUDED
    assert classify(key(old, key_id="k2"), now, excluded) is KeyState.DUE
    assert is_excluded(KeyRef("acme", "any"), ["acme/*"])
    assert not is_excluded(KeyRef("acme2", "any"), ["acme/*"])


def test_policy_rejects_warning_longer_than_max_age() -> None:
    """warn_before_days must stay below max_age_days."""
    with pytest.raises(ValueError):
        Policy(max_age_days=10, warn_before_days=10)


def test_window_inside_and_next_open_on_weekdays() -> None:
    """Mon-Fri 09:00-17:00 Paris: open on a Tuesday morning, next opens Monday from a Saturday."""
    window = RotationWindow.parse("Mon-Fri 09:00-17:00 Europe/Paris")
    tuesday_10_paris = datetime(2026, 6, 2, 8, 0, tzinfo=UTC)  # CEST = UTC+2
    assert window.contains(tuesday_10_paris)
    assert window.next_open(tuesday_10_paris) == tuesday_10_paris
    assert not window.contains(datetime(2026, 6, 2, 15, 0, tzinfo=UTC))  # 17:00 Paris, end exclusive
    saturday = datetime(2026, 6, 6, 12, 0, tzinfo=UTC)
    assert window.next_open(saturday) == datetime(2026, 6, 8, 7, 0, tzinfo=UTC)


def test_window_follows_daylight_saving_change() -> None:
    """Across the spring change the window opens at 09:00 local, which moves from 08:00 to 07:00 UTC."""
    window = RotationWindow.parse("Mon-Fri 09:00-17:00 Europe/Paris")
    friday_evening = datetime(2026, 3, 27, 18, 0, tzinfo=UTC)  # CET; DST starts Sun 29 Mar
    assert window.next_open(friday_evening) == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)
    thursday_before = datetime(2026, 3, 26, 7, 30, tzinfo=UTC)  # 08:30 CET: closed
    assert not window.contains(thursday_before)
    assert window.next_open(thursday_before) == datetime(2026, 3, 26, 8, 0, tzinfo=UTC)


def test_window_start_inside_spring_forward_gap() -> None:
    """A window opening at 02:30 on the day 02:00-03:00 does not exist opens at a real instant."""
    window = RotationWindow.parse("Sun 02:30-04:00 Europe/Paris")
    before = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    opening = window.next_open(before)
    assert opening.date().isoformat() == "2026-03-29"
    assert window.contains(opening)


@pytest.mark.parametrize("text", ["Mon-Fri 9-17 Europe/Paris", "Mon-Xyz 09:00-17:00 UTC",
                                  "Mon 17:00-09:00 UTC", "Mon 09:00-17:00 Mars/Olympus"])
def test_window_rejects_bad_text(text: str) -> None:
    """A malformed window is refused with a message."""
    with pytest.raises(ValueError):
        RotationWindow.parse(text)


def test_window_wraps_weekday_ranges() -> None:
    """`Sat-Mon` covers Saturday, Sunday and Monday."""
    window = RotationWindow.parse("Sat-Mon 00:00-24:00 UTC")
    assert window.weekdays == frozenset({5, 6, 0})


@pytest.mark.parametrize("age_days_", [0, 1, 75.99, 76, 89.999, 90, 91, 400])
@pytest.mark.parametrize("env", list(Environment))
@pytest.mark.parametrize("excluded", [False, True])
def test_assess_agrees_with_the_small_helpers(age_days_: float, env: Environment, excluded: bool) -> None:
    """The scan's one-pass `assess` gives what is_due, is_due_soon, in_scope and is_excluded say."""
    from rotator.policy import assess, due_at, in_scope

    now = ts("2026-06-01T00:00:00")
    k = key(now - 900 * DAY, reset=now - age_days_ * DAY, env=env)
    policy = Policy(exclude=("acme/k1",) if excluded else ())
    state, age, due = assess(k, now, policy)
    if not in_scope(k, policy):
        expected = KeyState.OUT_OF_SCOPE
    elif is_excluded(k.ref, policy.exclude):
        expected = KeyState.EXCLUDED
    elif is_due(k, now, policy):
        expected = KeyState.DUE
    elif is_due_soon(k, now, policy):
        expected = KeyState.DUE_SOON
    else:
        expected = KeyState.OK
    assert state is expected
    assert age == pytest.approx(age_days(k, now) * DAY) and due == due_at(k, policy)
