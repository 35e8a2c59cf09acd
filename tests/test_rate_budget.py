"""The fleet's rate budget (rotator.budget) in a real Redis: one script decides every call of every
worker, so the share, the reserve, a 429's pause and a paced rate hold for the fleet as a whole."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from rotator.budget import FINISH, PREPAID, READ, WRITE, RateBudget
from rotator.errors import BudgetSpent


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    import uuid

    conn = redis.Redis.from_url(redis_server + "/0")
    conn.ns = f"b-{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    yield conn
    for key in conn.scan_iter(f"{conn.ns}:*"):  # type: ignore[attr-defined]
        conn.delete(key)
    conn.close()


def budget(client: redis.Redis, clock: Clock, **kwargs: object) -> RateBudget:
    return RateBudget(client, client.ns, clock=clock, **kwargs)  # type: ignore[attr-defined, arg-type]


def window(clock: Clock, made: int, left: int, length: int = 900) -> tuple[int, int, float]:
    """What an answer shows: calls made, calls left, seconds until the window resets."""
    return (made, left, float(length))


def granted(b: RateBudget, kind: str = READ, seen: tuple[tuple[int, int, float], ...] = ()) -> int:
    """How many calls of `kind` go before the budget holds one back."""
    count = 0
    while b.take("acme", kind, seen).granted:
        seen = ()
        count += 1
        assert count < 10_000
    return count


def test_the_share_is_of_what_was_left_at_first_sight_and_fixed_until_the_window_resets(
        client: redis.Redis, clock: Clock) -> None:
    b = budget(client, clock, share=0.5, reserve=0.0)
    assert b.take("acme").granted  # no window known yet: the first call goes (and counts at first sight)
    assert granted(b, READ, (window(clock, 2_000, 300),)) == 149  # 0.5 x 300, less the call before
    held = b.take("acme")
    assert not held.granted and held.until == clock.now + 900 and held.why == "share:1"
    # Later answers showing more left (the platform quiet) do not raise the allowance in the window.
    assert not b.take("acme", READ, (window(clock, 2_100, 500),)).granted
    assert b.view("acme").windows[0].allowance == 150
    # A late answer of an older window (its reset well before the known one's) changes nothing.
    clock.now += 100
    assert b.take("acme", FINISH, (window(clock, 50, 10, 200),)).granted and b.view("acme").windows[0].left > 10
    clock.now -= 100
    clock.now += 901  # the window is over: the next answer's window gets its own allowance
    assert granted(b, READ, (window(clock, 1, 2_299),)) == 1_149
    # The service starting its window again before this clock says so (fewer calls made, a later
    # reset) is a new window too; a late answer of the old window is not.
    assert granted(b, READ, (window(clock, 0, 2_300, 950),)) == 1_150
    assert not b.take("acme", READ, (window(clock, 0, 2_300, 900),)).granted


def test_every_window_binds_and_a_write_spends_two(client: redis.Redis, clock: Clock) -> None:
    b = budget(client, clock, share=0.2, reserve=0.0)
    seen = (window(clock, 0, 2_300), window(clock, 0, 50, 1_800), window(clock, 0, 8_800, 3_600))
    assert granted(b, WRITE, seen) == 5  # the 30-minute window's 0.2 x 50 = 10 calls, two a write
    held = b.take("acme", WRITE)
    assert held.why == "share:2" and held.until == clock.now + 1_800


def test_below_the_reserve_nothing_goes_until_the_window_resets(client: redis.Redis, clock: Clock) -> None:
    b = budget(client, clock, share=1.0, reserve=0.1)
    assert granted(b, READ, (window(clock, 2_060, 240),)) == 10  # down to 230 left: 10% of 2,300
    assert b.take("acme").why == "reserve:1"
    assert b.take("acme", FINISH).granted  # settling an attempt already sent spends past the reserve


def test_a_429_pauses_every_call_even_a_replay(client: redis.Redis, clock: Clock) -> None:
    worker, other = budget(client, clock), budget(client, clock)
    worker.observe("acme", (window(clock, 100, 2_200),), pause_s=120, pause_why="429")
    first, second = other.take("acme"), worker.take("acme", FINISH)
    assert not first.granted and not second.granted and first.until == clock.now + 120 and first.why == "429"
    assert not other.take("acme", PREPAID).granted
    clock.now += 121
    assert other.take("acme").granted and worker.take("acme", PREPAID).granted
    # A 429 whose windows show none left holds back until that window resets, the pause aside.
    worker.observe("acme", (window(clock, 2_300, 0, 779),), pause_s=5, pause_why="429")
    assert other.take("acme").why == "reserve:1"
    clock.now += 6
    assert other.take("acme").why == "reserve:1" and other.take("acme", FINISH).granted


def test_a_pause_is_at_most_fifteen_minutes(client: redis.Redis, clock: Clock) -> None:
    """A gateway's Retry-After of days pauses the fleet for 15 minutes at most (a replay may look
    again then); windows the answer shows spent still hold the share's calls until they reset."""
    from rotator.budget import MAX_PAUSE_S

    b = budget(client, clock)
    b.observe("acme", pause_s=999_999, pause_why="429")
    assert b.take("acme", FINISH).until == clock.now + MAX_PAUSE_S == clock.now + 900


def test_a_paced_rate_is_shared_and_waits_rather_than_defers(client: redis.Redis, clock: Clock) -> None:
    a, b = (budget(client, clock, requests_per_second=10, burst=2, longest_wait_s=0.35) for _ in range(2))
    waits = [x.take("acme").wait_s for x in (a, b, a, b, a)]  # two at once, then one each 0.1 s
    assert waits == pytest.approx([0, 0, 0.1, 0.2, 0.3], abs=1e-6)
    held = b.take("acme")  # the next slot is more than the longest wait away
    assert not held.granted and held.why == "rate" and held.until == pytest.approx(clock.now + 0.4)
    clock.now += 1
    assert a.take("acme").granted and a.take("acme").wait_s == 0


def test_wait_or_defer_sleeps_for_a_short_hold_and_raises_past_it(client: redis.Redis, clock: Clock) -> None:
    b = budget(client, clock, share=0.5, reserve=0.0, longest_wait_s=30)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    b.observe("acme", pause_s=10, pause_why="429")
    b.wait_or_defer("acme", READ, sleep=sleep)  # a short pause is waited out
    assert slept == [pytest.approx(10)]
    b.observe("acme", (window(clock, 2_000, 4),))  # 0.5 x 4, less the call made before it was seen
    b.wait_or_defer("acme", READ, sleep=sleep)
    with pytest.raises(BudgetSpent, match=r"spent until .*rotator's share of window 1 is used.*this call was not sent"):
        b.wait_or_defer("acme", READ, sleep=sleep)


def test_many_workers_at_once_never_spend_more_than_the_share(client: redis.Redis, clock: Clock) -> None:
    seen = (window(clock, 0, 1_000),)
    budget(client, clock, share=0.3).observe("acme", seen)
    counts = [0] * 8

    def work(index: int) -> None:
        mine = budget(client, clock, share=0.3)
        while mine.take("acme").granted:
            counts[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 300


def test_without_redis_a_scan_goes_on_and_says_so_once(clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):  # a rotation cannot run without it anyway
        RateBudget(down, clock=clock).take("acme")
    b = RateBudget(down, clock=clock, fail_open=True)  # a scan: it goes on
    assert b.take("acme").granted and b.take("acme").granted  # the second without asking again
    written = capsys.readouterr()
    assert (written.out + written.err).count("budget.unreachable") == 1


def test_a_budget_with_nothing_to_meter_is_asked_once_a_second(client: redis.Redis, clock: Clock) -> None:
    """A key service that publishes no windows (and no paced rate): one round trip a second per
    process, not one per call; a window seen, or a pause, is told at once and metered again."""
    import time

    b = budget(client, clock, share=0.5)
    asked = []
    script = b._script
    b._script = lambda **kw: asked.append(1) or script(**kw)  # type: ignore[assignment, func-returns-value]
    for _ in range(5):
        assert b.take("acme").granted
    assert len(asked) == 1
    assert b.take("acme", READ, (window(clock, 0, 10),)).granted and len(asked) == 2  # told at once
    assert granted(b) == 3 and len(asked) == 6  # metered again: 0.5 x 10, less the first call and that one
    b._idle_until["other"] = time.monotonic() + 60
    b.observe("other", pause_s=5, pause_why="429")  # a pause is told at once ...
    assert not b.take("other").granted  # ... and the next call asks
