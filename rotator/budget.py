"""The key service's rate limit, shared by the whole fleet: one budget per Client ID in Redis.

The payment API's rate limit belongs to the platform (payments included), so rotator spends only
a share of it, and every worker and CLI process spends from the same budget. Each window the
key service publishes (`X-RateLimit…` headers) gets an allowance of `share` times the calls it
had left when the fleet first saw it, fixed until it resets; below `reserve` (a fraction of the
window's limit) nothing more is sent until it resets; a 429 pauses everyone until its
`Retry-After`. A key service that publishes no windows (AWS IAM) is paced by a shared token
bucket instead (GCRA: `requests_per_second`, `burst`). One Lua script decides each call
atomically, folding in the windows the caller's last answer showed: one round trip per call.

A call the budget holds back is deferred (`BudgetSpent`, with the time it returns), never failed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import redis

from rotator import logs
from rotator.errors import BudgetSpent

log = logs.get("rotator.budget")

#: What a call may spend: a read or a write may be deferred; a `finish` (what settles an attempt
#: already sent: its replay, and the reads of `finishing()`) spends past the share and the
#: reserve, only a pause stops it; the token check of a new secret was paid for by its write.
READ, WRITE, FINISH, PREPAID = "read", "write", "finish", "prepaid"
#: A write spends two calls: itself and the token check of the secret it returns.
WANTED: Final = {READ: 1, WRITE: 2, FINISH: 1, PREPAID: 0}
#: How long a budget no worker touches is kept (the longest published window is a day).
KEEP_S: Final = 2 * 86_400
MAX_WINDOWS: Final = 8
#: A budget with nothing to meter (no window published, no pause, no paced rate) is asked again
#: after this long, not before every call; another worker's 429 is seen at most this late.
IDLE_S: Final = 1.0
#: After the state store fails to answer, calls go unmetered this long before it is asked again.
UNMETERED_S: Final = 30.0
#: The longest pause one 429 sets (a gateway's Retry-After may say days): the windows the answer
#: shows spent hold the share's calls until they reset anyway; a replay may look again after it.
MAX_PAUSE_S: Final = 900.0
#: Two answers whose reset times (on the state store's clock) are this close name one window.
SAME_WINDOW_S: Final = 5.0

_SETTLING: ContextVar[bool] = ContextVar("rotator_budget_settling", default=False)


@contextmanager
def finishing() -> Iterator[None]:
    """The reads in this block settle an attempt already sent (the key, its successor): they go
    past the share and the reserve like its replay, since a secret may depend on them."""
    token = _SETTLING.set(True)
    try:
        yield
    finally:
        _SETTLING.reset(token)


#: KEYS[1]: the budget. ARGV: now ('' = the state store's own clock, one for every worker), want
#: (-1: only record what was seen), priority (1/0), share, reserve, interval (GCRA; 0: none),
#: tolerance, longest wait, pause (seconds from now; 0: none), why of that pause, keep (ms), n, then
#: n x (made, left, seconds until its reset). Returns {granted, wait (seconds), until (the state
#: store's clock; 0 when granted), why, idle}.
_TAKE = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
if now == nil then local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local want, priority = tonumber(ARGV[2]), ARGV[3] == '1'
local share, reserve = tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, tolerance, longest = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local pause_for, pause_why, keep, n = tonumber(ARGV[9]), ARGV[10], ARGV[11], tonumber(ARGV[12])
local same = tonumber(ARGV[13])
local h = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local out = {}
local function set(f, v) h[f] = tostring(v); out[#out + 1] = f; out[#out + 1] = h[f] end
local function num(f) return tonumber(h[f] or '') end
local unmetered, first = 0, false
if (num('ut') or 0) >= now - 60 then unmetered = num('u') or 0 end
for i = 1, n do
  local made, left = tonumber(ARGV[11 + 3 * i]), tonumber(ARGV[12 + 3 * i])
  local reset = now + tonumber(ARGV[13 + 3 * i])
  local r = num('r' .. i)
  if reset > now then
    -- A new window: none known, the known one is over, or the service started it again early
    -- (a later reset, and fewer calls made than already seen). An answer of an older window
    -- (its reset well before the known one's) is ignored; one of the same window narrows it.
    if r == nil or now >= r or (reset > r + same and made < (num('k' .. i) or 0)) then
      set('r' .. i, reset); set('l' .. i, left); set('m' .. i, made + left); set('k' .. i, made)
      set('a' .. i, math.floor(share * left)); set('s' .. i, unmetered); first = true
    elseif reset >= r - same then
      if left < (num('l' .. i) or left + 1) then set('l' .. i, left) end
      if made + left > (num('m' .. i) or 0) then set('m' .. i, made + left) end
      if made > (num('k' .. i) or 0) then set('k' .. i, made) end
    end
  end
  if i > (num('w') or 0) then set('w', i) end
end
if first and unmetered > 0 then set('u', 0) end
if pause_for > 0 and now + pause_for > (num('p') or 0) then set('p', now + pause_for); set('pw', pause_why) end
local granted, wait, held, why = 1, 0, 0, ''
if want >= 0 then
  if (num('p') or 0) > now then held = num('p'); why = h['pw'] or 'paused' end
  if want > 0 and not priority then
    for i = 1, (num('w') or 0) do
      local r = num('r' .. i)
      if r ~= nil and r > now then
        local over = ''
        if num('s' .. i) + want > num('a' .. i) then over = 'share'
        elseif num('l' .. i) - want < math.ceil(reserve * num('m' .. i)) then over = 'reserve' end
        if over ~= '' and r > held then held = r; why = over .. ':' .. i end
      end
    end
  end
  local tat = math.max(num('t') or 0, now)
  local at = math.max(now, tat - tolerance)
  if held == 0 and interval > 0 and at - now > longest then held = at; why = 'rate' end
  if held > 0 then
    granted, wait = 0, held - now
  else
    local metered = false
    for i = 1, (num('w') or 0) do
      local r = num('r' .. i)
      if r ~= nil and r > now then
        set('s' .. i, num('s' .. i) + want); set('l' .. i, num('l' .. i) - want); metered = true
      end
    end
    if not metered and want > 0 then  -- counted at the first sight of a window, if it comes soon
      if (num('ut') or 0) < now - 60 then set('u', want); set('ut', now) else set('u', (num('u') or 0) + want) end
    end
    if interval > 0 then set('t', tat + interval); wait = at - now end
  end
end
if #out > 0 then redis.call('HSET', key, unpack(out)) end
redis.call('PEXPIRE', key, keep)
local idle = 1  -- nothing to meter: no live window, no pause, no paced rate
if interval > 0 or (num('p') or 0) > now then idle = 0 end
for i = 1, (num('w') or 0) do
  if (num('r' .. i) or 0) > now then idle = 0 end
end
return {granted, tostring(wait), tostring(held), why, idle}
"""

#: One window an answer showed: (calls made, calls left, seconds until it resets).
Seen = tuple[int, int, float]


@dataclass(frozen=True, slots=True)
class Verdict:
    granted: bool
    wait_s: float  # granted: how long to wait for the call's slot; held back: until it may go
    until: float  # held back: when (the state store's clock, Unix seconds); 0.0 when granted
    why: str  # held back: `share:N`, `reserve:N` (window N, in the order published), `rate`, `429`


@dataclass(frozen=True, slots=True)
class WindowView:
    index: int  # its place in the order the key service publishes its windows, from 1
    limit: int
    left: int  # as last seen, less what the fleet has sent since
    allowance: int
    spent: int
    resets_at: float


@dataclass(frozen=True, slots=True)
class BudgetView:
    client_id: str
    windows: tuple[WindowView, ...]
    paused_until: float
    pause_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "paused_until": self.paused_until or None,
                "pause_reason": self.pause_reason,
                "windows": [{"window": w.index, "limit": w.limit, "left": w.left, "allowance": w.allowance,
                             "spent": w.spent, "resets_at": w.resets_at} for w in self.windows]}

    def holds(self, reserve: float, now: float) -> tuple[float, str]:
        """Read only (a person's look): (until, why) when a pause, or a live window down to its
        reserve, holds a call back; (0.0, "") when it may go."""
        if self.paused_until > now:
            return self.paused_until, self.pause_reason or "paused"
        for w in self.windows:
            if w.resets_at > now and w.left - 1 < math.ceil(reserve * w.limit):
                return w.resets_at, f"reserve:{w.index}"
        return 0.0, ""


class RateBudget:
    """The fleet's budget of key-service calls, per Client ID, in one Redis. `clock` is for tests:
    by default the script reads the state store's own clock, one for every worker."""

    def __init__(self, client: redis.Redis, namespace: str = "rotator", *, share: float = 0.2,
                 reserve: float = 0.1, requests_per_second: float | None = None, burst: int = 1,
                 longest_wait_s: float = 30.0, clock: Callable[[], float] | None = None,
                 fail_open: bool = False) -> None:
        self.client = client
        self.namespace = namespace
        self.share = share
        self.reserve = reserve
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.tolerance = self.interval * max(0, burst - 1)
        self.longest_wait_s = longest_wait_s
        self.clock = clock
        self.fail_open = fail_open  # the state store out of reach: calls go (a scan) rather than fail
        self.looking = False  # a person's look (`status`, the page): read only, never counted
        self._script = client.register_script(_TAKE)
        self._warned = False
        self._down_until = 0.0  # monotonic: the state store failed; calls go unmetered until then
        self._idle_until: dict[str, float] = {}  # monotonic, per Client ID: nothing to meter until then
        #: Per Client ID, a 429's pause this process could not tell the fleet (a look writes nothing;
        #: the state store down): (until, why), kept here so its own retries wait for it.
        self._paused_here: dict[str, tuple[float, str]] = {}

    def key(self, client_id: str) -> str:
        return f"{self.namespace}:budget:{client_id}"

    def now(self) -> float:
        """The budget's clock: the state store's (or the test's)."""
        if self.clock is not None:
            return self.clock()
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    def take(self, client_id: str, kind: str = READ, seen: Sequence[Seen] = (), pause_s: float = 0.0,
             pause_why: str = "") -> Verdict:
        """Spend one call of `kind` (`seen`: what the last answer showed). Redis out of reach: with
        `fail_open`, the call goes (logged once; the key service's own 429 still stops it), else
        the Redis error is raised. Inside `finishing()` a read is a `finish`."""
        if kind == READ and _SETTLING.get():
            kind = FINISH
        return self._run(client_id, WANTED[kind], kind in (FINISH, PREPAID), seen, pause_s, pause_why)

    def for_people(self) -> RateBudget:
        """The same budget for what a person looks at (`status`, the page, the metrics' scan): read,
        never written (looking changes nothing in the state store), held back by a pause or a
        window down to its reserve, never by the share, so the fleet's view stays readable when
        the share is spent. (A page and the metrics cache their scan.)"""
        look = copy.copy(self)
        look.looking = True
        look._paused_here = {}  # its own, not the worker's budget's
        look._idle_until = {}
        return look

    def observe(self, client_id: str, seen: Sequence[Seen] = (), pause_s: float = 0.0,
                pause_why: str = "") -> Verdict:
        """Record what an answer showed (and a 429's pause, at most `MAX_PAUSE_S`), spending nothing."""
        return self._run(client_id, -1, False, seen, pause_s, pause_why)

    def _run(self, client_id: str, want: int, priority: bool, seen: Sequence[Seen], pause_s: float,
             pause_why: str) -> Verdict:
        down = time.monotonic() < self._down_until
        if pause_s > 0 and (self.looking or down):  # a 429 this process cannot tell the fleet: it keeps it
            self._pause_here(client_id, pause_s, pause_why)
        here = self._paused_here.get(client_id)
        if want >= 0 and here is not None and here[0] > time.time():
            return Verdict(False, here[0] - time.time(), here[0], here[1])
        if self.looking:
            return self._look(client_id) if want >= 0 else Verdict(True, 0.0, 0.0, "")
        windows = list(seen)[:MAX_WINDOWS]
        if down or (want >= 0 and not windows and not pause_s
                    and time.monotonic() < self._idle_until.get(client_id, 0.0)):
            return Verdict(True, 0.0, 0.0, "")
        args: list[Any] = ["" if self.clock is None else repr(self.clock()), want, int(priority), repr(self.share),
                           repr(self.reserve), repr(self.interval), repr(self.tolerance), repr(self.longest_wait_s),
                           repr(min(max(pause_s, 0.0), MAX_PAUSE_S)), pause_why, int(KEEP_S * 1000), len(windows),
                           repr(SAME_WINDOW_S)]
        for made, left, reset_in in windows:
            args.extend((made, left, repr(float(reset_in))))
        try:
            granted, wait, until, why, idle = self._script(keys=[self.key(client_id)], args=args)
        except redis.RedisError as exc:
            if not self.fail_open:  # a rotation cannot run without the state store anyway
                raise
            self._down_until = time.monotonic() + UNMETERED_S  # not one time-out per call
            if pause_s > 0:
                self._pause_here(client_id, pause_s, pause_why)
            if not self._warned:
                self._warned = True
                log.warning("budget.unreachable", error_type=type(exc).__name__,
                            detail="calls go unmetered until the state store answers")
            return Verdict(True, 0.0, 0.0, "")
        if int(idle):  # a key service that publishes no windows: ask again in a second, not each call
            self._idle_until[client_id] = time.monotonic() + IDLE_S
        else:
            self._idle_until.pop(client_id, None)
        return Verdict(bool(int(granted)), float(_text(wait)), float(_text(until)), _text(why))

    def _pause_here(self, client_id: str, pause_s: float, why: str) -> None:
        until = time.time() + min(pause_s, MAX_PAUSE_S)
        if until > self._paused_here.get(client_id, (0.0, ""))[0]:
            self._paused_here[client_id] = (until, why)

    def _look(self, client_id: str) -> Verdict:
        try:
            now = self.now()
            until, why = self.view(client_id, now).holds(self.reserve, now)
        except redis.RedisError:
            if not self.fail_open:
                raise
            return Verdict(True, 0.0, 0.0, "")
        return Verdict(not until, max(0.0, until - now), until, why)

    def view(self, client_id: str, now: float | None = None) -> BudgetView:
        return _view(client_id, self.client.hgetall(self.key(client_id)), self.now() if now is None else now)

    def wait_or_defer(self, client_id: str, kind: str, seen: Sequence[Seen] = (), deadline: float = math.inf,
                      sleep: Callable[[float], None] = time.sleep) -> None:
        """Take one call, waiting for its slot when that is short (a paced rate, a short pause)
        and within `deadline` (monotonic); otherwise raise `BudgetSpent` with when it returns."""
        while True:
            verdict = self.take(client_id, kind, seen)
            seen = ()
            if verdict.granted:
                if verdict.wait_s > 0:
                    sleep(verdict.wait_s)
                return
            if verdict.wait_s <= self.longest_wait_s and time.monotonic() + verdict.wait_s < deadline:
                sleep(verdict.wait_s)
                continue
            raise BudgetSpent(client_id, verdict.until, verdict.why)


def _text(value: object) -> str:
    """A reply as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def views(client: redis.Redis, namespace: str, now: float | None = None) -> list[BudgetView]:
    """Every Client ID's budget the fleet keeps (for `status`, the page and the metrics); a
    read-only user of the state store can read them (it may not ask the store's clock: which
    windows are over is told by this host's, for display only)."""
    moment = time.time() if now is None else now
    found = []
    for key in sorted(_text(k) for k in client.scan_iter(match=f"{namespace}:budget:*", count=500)):
        found.append(_view(key.rsplit(":", 1)[-1], client.hgetall(key), moment))
    return [v for v in found if v.windows or v.paused_until]


def _view(client_id: str, raw: dict[Any, Any], now: float) -> BudgetView:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    windows = []
    for i in range(1, int(fields.get("w", "0")) + 1):
        reset = float(fields.get(f"r{i}", "0"))
        if reset <= now:
            continue
        windows.append(WindowView(i, int(float(fields[f"m{i}"])), max(0, int(float(fields[f"l{i}"]))),
                                  int(float(fields[f"a{i}"])), int(float(fields[f"s{i}"])), reset))
    paused = float(fields.get("p", "0"))
    return BudgetView(client_id, tuple(windows), paused if paused > now else 0.0,
                      fields.get("pw", "") if paused > now else "")


def from_dict(data: dict[str, Any]) -> BudgetView:
    """`BudgetView.to_dict` read back (a published view, `status --json`)."""
    return BudgetView(str(data["client_id"]), tuple(
        WindowView(int(w.get("window", n)), int(w["limit"]), int(w["left"]), int(w["allowance"]), int(w["spent"]),
                   float(w["resets_at"])) for n, w in enumerate(data.get("windows") or [], 1)),
        float(data.get("paused_until") or 0.0), str(data.get("pause_reason", "")))


def describe(view: BudgetView) -> str:
    """One line for people: each window's calls left of rotator's allowance, and any pause."""
    from datetime import UTC, datetime

    def clock(when: float) -> str:
        if not 0 <= when < 253_402_300_800:
            return "never"
        return datetime.fromtimestamp(when, UTC).strftime("%H:%M:%SZ")

    parts = [f"window {w.index}: {max(0, w.allowance - w.spent)} of {w.allowance} calls left to rotator "
             f"({w.left} of {w.limit} to the Client ID), resets {clock(w.resets_at)}" for w in view.windows]
    if view.paused_until:
        parts.insert(0, f"paused until {clock(view.paused_until)} ({view.pause_reason})")
    return "; ".join(parts)
