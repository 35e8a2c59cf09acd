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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis

from rotator import logs
from rotator.errors import BudgetSpent

log = logs.get("rotator.budget")

#: What a call may spend: a read or a write may be deferred; a `finish` (the replay that settles
#: an attempt already sent) spends past the share and the reserve, only a pause stops it; the
#: token check of a new secret was paid for by its write.
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

#: KEYS[1]: the budget. ARGV: now, want (-1: only record what was seen), priority (1/0), share,
#: reserve, interval (GCRA; 0: none), tolerance, longest wait, pause until (0: none), why of that
#: pause, keep (ms), n, then n x (made, left, reset). Returns {granted, seconds (the wait if
#: granted, else until when), why, announce}.
_TAKE = """
local key = KEYS[1]
local now, want, priority = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local share, reserve = tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, tolerance, longest = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local pause_until, pause_why, keep, n = tonumber(ARGV[9]), ARGV[10], ARGV[11], tonumber(ARGV[12])
local h = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local out = {}
local function set(f, v) h[f] = tostring(v); out[#out + 1] = f; out[#out + 1] = h[f] end
local function num(f) return tonumber(h[f] or '') end
local unmetered, first = 0, false
if (num('ut') or 0) >= now - 60 then unmetered = num('u') or 0 end
for i = 1, n do
  local made, left, reset = tonumber(ARGV[10 + 3 * i]), tonumber(ARGV[11 + 3 * i]), tonumber(ARGV[12 + 3 * i])
  local r = num('r' .. i)
  if reset > now then
    -- A new window: none known, the known one is over by this clock, or the service started it
    -- again before this clock says (a later reset, and fewer calls made than already seen).
    if r == nil or now >= r or (reset > r and made < (num('k' .. i) or 0)) then
      set('r' .. i, reset); set('l' .. i, left); set('m' .. i, made + left); set('k' .. i, made)
      set('a' .. i, math.floor(share * left)); set('s' .. i, unmetered); first = true
    else
      if left < (num('l' .. i) or left + 1) then set('l' .. i, left) end
      if made + left > (num('m' .. i) or 0) then set('m' .. i, made + left) end
      if made > (num('k' .. i) or 0) then set('k' .. i, made) end
    end
  end
  if i > (num('w') or 0) then set('w', i) end
end
if first and unmetered > 0 then set('u', 0) end
if pause_until > (num('p') or 0) then set('p', pause_until); set('pw', pause_why) end
local granted, seconds, why, announce = 1, 0, '', 0
if want >= 0 then
  local held = 0
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
    granted, seconds = 0, held
    if held > (num('ann') or 0) then set('ann', held); announce = 1 end
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
    if interval > 0 then set('t', tat + interval); seconds = at - now end
  end
end
if #out > 0 then redis.call('HSET', key, unpack(out)) end
redis.call('PEXPIRE', key, keep)
local idle = 1  -- nothing to meter: no live window, no pause, no paced rate
if interval > 0 or (num('p') or 0) > now then idle = 0 end
for i = 1, (num('w') or 0) do
  if (num('r' .. i) or 0) > now then idle = 0 end
end
return {granted, tostring(seconds), why, announce, idle}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    granted: bool
    seconds: float  # granted: how long to wait for the call's slot; held back: until when (Unix time)
    why: str  # held back: `share:N`, `reserve:N` (window N), `rate`, or the pause's reason
    announce: bool  # the first process to be held back until this time (says so once for the fleet)


@dataclass(frozen=True, slots=True)
class WindowView:
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
                "windows": [{"limit": w.limit, "left": w.left, "allowance": w.allowance, "spent": w.spent,
                             "resets_at": w.resets_at} for w in self.windows]}


class RateBudget:
    """The fleet's budget of key-service calls, per Client ID, in one Redis."""

    def __init__(self, client: redis.Redis, namespace: str = "rotator", *, share: float = 0.2,
                 reserve: float = 0.1, requests_per_second: float | None = None, burst: int = 1,
                 longest_wait_s: float = 30.0, clock: Callable[[], float] = time.time,
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
        self.looking = False  # a person's look (`status`, the page): not counted, held back only by a pause
        self._script = client.register_script(_TAKE)
        self._warned = False
        self._down_until = 0.0  # monotonic: the state store failed; calls go unmetered until then
        self._idle_until: dict[str, float] = {}  # monotonic, per Client ID: nothing to meter until then

    def key(self, client_id: str) -> str:
        return f"{self.namespace}:budget:{client_id}"

    def take(self, client_id: str, kind: str = READ, seen: Sequence[tuple[int, int, int]] = (),
             pause_until: float = 0.0, pause_why: str = "") -> Verdict:
        """Spend one call of `kind` (`seen`: the windows the last answer showed, (made, left,
        reset) each). Redis out of reach: with `fail_open`, the call goes (logged once; the key
        service's own 429 still stops it), else the Redis error is raised."""
        return self._run(client_id, WANTED[kind], kind in (FINISH, PREPAID), seen, pause_until, pause_why)

    def for_people(self) -> RateBudget:
        """The same budget for what a person looks at (`status`, the page): read, never written
        (looking changes nothing in the state store), and only a 429's pause holds it back, so the
        fleet's view stays readable when the share is spent. (A page caches its scan.)"""
        look = copy.copy(self)
        look.looking = True
        return look

    def observe(self, client_id: str, seen: Sequence[tuple[int, int, int]] = (), pause_until: float = 0.0,
                pause_why: str = "") -> Verdict:
        """Record what an answer showed (and a 429's pause) without spending anything."""
        return self._run(client_id, -1, False, seen, pause_until, pause_why)

    def _run(self, client_id: str, want: int, priority: bool, seen: Sequence[tuple[int, int, int]],
             pause_until: float, pause_why: str) -> Verdict:
        if self.looking:  # read, never written: only a pause holds a person's look back
            return self._look(client_id) if want >= 0 else Verdict(True, 0.0, "", False)
        windows = list(seen)[:MAX_WINDOWS]
        args: list[Any] = [repr(self.clock()), want, int(priority), repr(self.share), repr(self.reserve),
                           repr(self.interval), repr(self.tolerance), repr(self.longest_wait_s),
                           repr(pause_until), pause_why, int(KEEP_S * 1000), len(windows)]
        for made, left, reset in windows:
            args.extend((made, left, reset))
        if time.monotonic() < self._down_until or (want >= 0 and not windows and not pause_until
                                                   and time.monotonic() < self._idle_until.get(client_id, 0.0)):
            return Verdict(True, 0.0, "", False)
        try:
            granted, seconds, why, announce, idle = self._script(keys=[self.key(client_id)], args=args)
        except redis.RedisError as exc:
            if not self.fail_open:  # a rotation cannot run without the state store anyway
                raise
            self._down_until = time.monotonic() + UNMETERED_S  # not one time-out per call
            if not self._warned:
                self._warned = True
                log.warning("budget.unreachable", error_type=type(exc).__name__,
                            detail="calls go unmetered until the state store answers")
            return Verdict(True, 0.0, "", False)
        if int(idle):  # a key service that publishes no windows: ask again in a second, not each call
            self._idle_until[client_id] = time.monotonic() + IDLE_S
        else:
            self._idle_until.pop(client_id, None)
        return Verdict(bool(int(granted)), float(_text(seconds)), _text(why), bool(int(announce)))

    def _look(self, client_id: str) -> Verdict:
        try:
            paused = self.view(client_id)
        except redis.RedisError:
            if not self.fail_open:
                raise
            return Verdict(True, 0.0, "", False)
        if paused.paused_until:
            return Verdict(False, paused.paused_until, paused.pause_reason, False)
        return Verdict(True, 0.0, "", False)

    def view(self, client_id: str) -> BudgetView:
        return _view(client_id, self.client.hgetall(self.key(client_id)), self.clock())

    def wait_or_defer(self, client_id: str, kind: str, seen: Sequence[tuple[int, int, int]] = (),
                      deadline: float = math.inf, sleep: Callable[[float], None] = time.sleep) -> None:
        """Take one call, waiting for its slot when that is short (a paced rate, a short pause)
        and within `deadline` (monotonic); otherwise raise `BudgetSpent` with when it returns."""
        while True:
            verdict = self.take(client_id, kind, seen)
            seen = ()
            if verdict.granted:
                if verdict.seconds > 0:
                    sleep(verdict.seconds)
                return
            wait = verdict.seconds - self.clock()
            if wait <= self.longest_wait_s and time.monotonic() + wait < deadline:
                sleep(max(wait, 0.0))
                continue
            raise BudgetSpent(client_id, verdict.seconds, verdict.why, announce=verdict.announce)


def _text(value: object) -> str:
    """A reply as text, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def views(client: redis.Redis, namespace: str, now: float | None = None) -> list[BudgetView]:
    """Every Client ID's budget the fleet keeps (for `status`, the page and the metrics); a
    read-only user of the state store can read them."""
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
        windows.append(WindowView(int(float(fields[f"m{i}"])), max(0, int(float(fields[f"l{i}"]))),
                                  int(float(fields[f"a{i}"])), int(float(fields[f"s{i}"])), reset))
    paused = float(fields.get("p", "0"))
    return BudgetView(client_id, tuple(windows), paused if paused > now else 0.0,
                      fields.get("pw", "") if paused > now else "")


def from_dict(data: dict[str, Any]) -> BudgetView:
    """`BudgetView.to_dict` read back (a published view, `status --json`)."""
    return BudgetView(str(data["client_id"]), tuple(
        WindowView(int(w["limit"]), int(w["left"]), int(w["allowance"]), int(w["spent"]), float(w["resets_at"]))
        for w in data.get("windows") or []), float(data.get("paused_until") or 0.0), str(data.get("pause_reason", "")))


def describe(view: BudgetView) -> str:
    """One line for people: each window's calls left of rotator's allowance, and any pause."""
    from datetime import UTC, datetime

    def clock(when: float) -> str:
        return datetime.fromtimestamp(when, UTC).strftime("%H:%M:%SZ")

    parts = [f"window {i}: {max(0, w.allowance - w.spent)} of {w.allowance} calls left to rotator "
             f"({w.left} of {w.limit} to the Client ID), resets {clock(w.resets_at)}"
             for i, w in enumerate(view.windows, 1)]
    if view.paused_until:
        parts.insert(0, f"paused until {clock(view.paused_until)} ({view.pause_reason})")
    return "; ".join(parts)
