"""Durable state in Redis: attempt records, per-key leases, rotation history, once-only markers.

Everything lives under one namespace. Secrets never enter Redis: records hold ids, times and
fingerprints only.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from rotator import logs
from rotator.domain import AttemptRecord, KeyRef
from rotator.errors import RotatorError

log = logs.get("rotator.state")
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end
return 0
"""
# Fenced writes: KEYS = lock, attempt, attempt set; ARGV = token, ref, record json / attempt id.
_SAVE_FENCED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[3])
redis.call('sadd', KEYS[3], ARGV[2])
return 1
"""
_DELETE_FENCED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local raw = redis.call('get', KEYS[2])
if raw and cjson.decode(raw)['attempt_id'] ~= ARGV[3] then return 2 end
redis.call('del', KEYS[2])
redis.call('srem', KEYS[3], ARGV[2])
return 1
"""
_SET_FENCED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

# The alias-template mode's lineage links (rotator.engine.successors) and the reload hooks' pending marks.
_PUT_LINKS = """
local how = ARGV[1]
for i = 2, #ARGV, 2 do
  local field, entry = ARGV[i], ARGV[i + 1]
  local current = redis.call('HGET', KEYS[1], field)
  if how == 'merge' and current then
    local merged = cjson.decode(current)
    for name, value in pairs(cjson.decode(entry)) do merged[name] = value end
    entry = cjson.encode(merged)
  end
  if how ~= 'new' or not current then redis.call('HSET', KEYS[1], field, entry) end
end
return 1
"""

_DROP_IF_SAME = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

_DROP_LINKS = """
local gone = {}
for _, key_id in ipairs(ARGV) do gone[key_id] = true; redis.call('HDEL', KEYS[1], key_id) end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local entry, changed = cjson.decode(all[i + 1]), false
  for _, name in ipairs({'replaces', 'replaced_by'}) do
    if entry[name] and gone[entry[name]] then entry[name] = nil; changed = true end
  end
  if changed then redis.call('HSET', KEYS[1], all[i], cjson.encode(entry)) end
end
return 1
"""

# The audit chain's append (rotator.audit): only when the chain's head is still the one the entry
# was hashed after. KEYS = head, history, then the keys the increments name; ARGV = expected head
# ("" for none), entry, new head, history length, the index in KEYS of the key's last-rotation slot
# (0: none), then per increment: KEYS index, field, amount, 1 for a float.
_APPEND_CHAINED = """
local head = redis.call('get', KEYS[1]) or ''
if head ~= ARGV[1] then return {0, head} end
redis.call('lpush', KEYS[2], ARGV[2])
redis.call('ltrim', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('set', KEYS[1], ARGV[3])
if tonumber(ARGV[5]) > 0 then redis.call('set', KEYS[tonumber(ARGV[5])], ARGV[2]) end
for i = 6, #ARGV, 4 do
  local key, field, amount = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  if ARGV[i + 3] == '1' then redis.call('hincrbyfloat', key, field, amount)
  else redis.call('hincrby', key, field, amount) end
end
return {1, ''}
"""
EPOCH_TTL_S = 2 * 86_400  # longer than the key service keeps a stored answer (24 h)


class LeaseLostError(RotatorError):
    """The key's lease expired or was taken over: stop before the next side effect."""


def owner_identity() -> str:
    """`host:pid:start:machine` of this process: lets a lease held by a dead process on this very
    machine and PID namespace be taken over (containers may share a host name and pid numbers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}:{_machine()}"


def _machine() -> str:
    """This boot of this kernel and this PID namespace; "?" where it cannot be told."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "?"
    return f"{boot}.{namespace}"


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks (with its pid, an identity no later process shares);
    "" for a process that is gone or a zombie, "?" where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return ""
    except (OSError, IndexError):
        return "?"
    return "" if fields[0] in ("Z", "X") else fields[19]


def _owner_is_dead(owner: str) -> bool:
    """True only when the owner provably ran on this host and that process is gone."""
    host, pid_text, start, machine, *_ = [*owner.split(":"), "", "", "", ""]
    if (host != socket.gethostname() or not pid_text.isdigit() or start in ("", "?")
            or machine in ("", "?") or machine != _machine()):
        return False
    return _start_ticks(int(pid_text)) != start  # gone, or the pid was reused by another process


class Lease:
    """A lock with an owner token: extended while work goes on, released only by its owner.

    A failed extension marks it lost; `check()` then raises, so the holder stops before its next
    side effect (and every fenced write refuses anyway)."""

    def __init__(self, client: redis.Redis, name: str, token: str, ttl_ms: int, taken_at: float) -> None:
        self._client = client
        self.name = name
        self.token = token
        self.ttl_ms = ttl_ms
        self._stop = threading.Event()
        self.lost = False
        # Ours for sure until then (this host's monotonic clock, counted from before the last
        # successful SET or extension): a pause longer than that means Redis may have expired it.
        self._valid_until = taken_at + ttl_ms / 1000

    def extend(self) -> bool:
        asked_at = time.monotonic()
        ok = bool(self._client.eval(_EXTEND, 1, self.name, self.token, self.ttl_ms))
        if ok:
            self._valid_until = asked_at + self.ttl_ms / 1000
        else:
            self.lost = True
        return ok

    def check(self) -> None:
        """Raise unless the lease is surely still ours: not reported lost, and its last extension
        recent enough (with a tenth of the TTL to spare) that Redis cannot have expired it."""
        if not self.lost and time.monotonic() > self._valid_until - self.ttl_ms / 10_000:
            self.lost = True
        if self.lost:
            raise LeaseLostError(f"lease {self.name} was lost")

    def release(self) -> bool:
        self._stop.set()
        return bool(self._client.eval(_RELEASE, 1, self.name, self.token))

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[Lease]:
        """Extend every third of the TTL in a thread until the block ends, then release."""

        def beat() -> None:
            while not self._stop.wait(self.ttl_ms / 3000) and not self.lost:
                with contextlib.suppress(redis.RedisError):
                    self.extend()

        thread = threading.Thread(target=beat, name=f"lease {self.name}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            with contextlib.suppress(redis.RedisError):
                self.release()
            thread.join(timeout=2)


class RedisState:
    def __init__(self, client: redis.Redis, namespace: str = "rotator", history_max: int = 1000,
                 audit_key: bytes | None = None) -> None:
        """`audit_key`: the audit chain's HMAC key (`audit.hmac_key_file`); None: plain SHA-256."""
        self.client = client
        self.ns = namespace
        self.history_max = history_max
        self.audit_key = audit_key
        self._head = ""  # the audit chain's head as this process last saw it ("seq:hash:alg")
        self._head_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, namespace: str = "rotator", history_max: int = 1000,
                 timeout_s: float = 10.0, audit_key: bytes | None = None) -> RedisState:
        """`timeout_s` bounds connecting and each answer: short (2 s) where a hung Redis would hold up
        the loop that takes tasks (the gate, the heartbeat) or a probe."""
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                        socket_connect_timeout=timeout_s, health_check_interval=30),
                   namespace, history_max, audit_key)

    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def now(self) -> float:
        """Redis's clock: one clock for every worker (in-doubt horizons, record times)."""
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    # --- leases ------------------------------------------------------------------------------
    def acquire(self, name: str, ttl_s: float) -> Lease | None:
        """The lease, or None while a live owner holds it. A lease whose owner process is provably
        dead (same host, process gone) is taken over at once instead of waiting out its TTL."""
        key = self._k("lock", name)
        token = f"{owner_identity()}:{secrets.token_hex(8)}"
        ttl_ms = int(ttl_s * 1000)
        asked_at = time.monotonic()
        if self.client.set(key, token, nx=True, px=ttl_ms):
            return Lease(self.client, key, token, ttl_ms, asked_at)
        held = self.client.get(key)
        asked_at = time.monotonic()
        if held and _owner_is_dead(str(held)) and self.client.eval(_TAKE_OVER, 1, key, held, token, ttl_ms):
            return Lease(self.client, key, token, ttl_ms, asked_at)
        return None

    def once(self, name: str, ttl_s: int) -> bool:
        """True the first time `name` is claimed within `ttl_s` (one beat, one alert)."""
        return bool(self.client.set(self._k("once", name), "1", nx=True, ex=max(1, ttl_s)))

    def seen(self, name: str) -> bool:
        """Whether `name` was claimed with `once` and has not expired (claims nothing)."""
        return bool(self.client.exists(self._k("once", name)))

    # --- attempt records (every write fenced by the key's lease) -----------------------------
    def save_attempt(self, attempt: AttemptRecord, lease: Lease) -> None:
        ref = str(attempt.ref)
        done = self.client.eval(_SAVE_FENCED, 3, lease.name, self._k("attempt", ref), self._k("attempts"),
                                lease.token, ref, json.dumps(attempt.to_dict()))
        if not done:
            lease.lost = True
            raise LeaseLostError(f"lease of {ref} lost: attempt record not written")

    def get_attempt(self, ref: KeyRef) -> AttemptRecord | None:
        raw = self.client.get(self._k("attempt", str(ref)))
        return AttemptRecord.from_dict(json.loads(raw)) if raw else None

    def key_state(self, ref: KeyRef) -> tuple[AttemptRecord | None, dict[str, Any] | None]:
        """The key's attempt record and its stored-rotation slot, read in one round trip (what a
        rotation reads first, under the key's lease)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self._k("attempt", str(ref)))
        pipe.get(self._k("stored", str(ref)))
        record, slot = pipe.execute()
        return (AttemptRecord.from_dict(json.loads(record)) if record else None,
                json.loads(slot) if slot else None)

    def delete_attempt(self, attempt: AttemptRecord, lease: Lease, stored_at: float | None = None,
                       held: tuple[str, list[str]] | None = None) -> None:
        """Delete the record only if it still is this attempt's and the lease is still ours. With
        `stored_at`, the key's stored-rotation slot (`mark_stored_rotation` of the attempt's
        generation; `held`: the generation now in every sink, and those sinks) is written first, in
        the same round trip and one transaction: a Redis that refuses the `SET` (full, say) runs
        neither, so the record stays for recovery, as when the two were sent apart; a lost lease
        still leaves the slot written, as it did then."""
        ref = str(attempt.ref)
        fenced = (_DELETE_FENCED, 3, lease.name, self._k("attempt", ref), self._k("attempts"), lease.token, ref,
                  attempt.attempt_id)
        if stored_at is None:
            done = self.client.eval(*fenced)
        else:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._k("stored", ref), _stored_slot(attempt.generation, stored_at, held))
            pipe.eval(*fenced)
            done = pipe.execute()[1]
        if done == 0:
            lease.lost = True
            raise LeaseLostError(f"lease of {ref} lost: attempt record not deleted")
        if done == 2:
            raise LeaseLostError(f"the attempt record of {ref} belongs to another attempt; not deleted")

    def attempts(self) -> list[AttemptRecord]:
        out = []
        for ref in sorted(str(r) for r in self.client.smembers(self._k("attempts"))):
            client_id, _, key_id = ref.partition("/")
            found = self.get_attempt(KeyRef(client_id, key_id))
            if found:
                out.append(found)
        return out

    def epoch_and_now(self, ref: KeyRef, generation: str) -> tuple[int, float]:
        """How many conclusive refusals this generation of the key has had (0 when unknown), and
        `now`, in one round trip (what an attempt reads before its record is saved)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self._k("epoch", str(ref)))
        pipe.time()
        raw, (seconds, micros) = pipe.execute()
        stored_generation, _, epoch = str(raw or "").rpartition("/")
        count = int(epoch) if raw and stored_generation == generation and epoch.isdigit() else 0
        return count, float(seconds) + micros / 1e6

    def set_epoch(self, ref: KeyRef, generation: str, epoch: int, lease: Lease) -> None:
        done = self.client.eval(_SET_FENCED, 2, lease.name, self._k("epoch", str(ref)), lease.token,
                                f"{generation}/{epoch}", EPOCH_TTL_S)
        if not done:
            lease.lost = True
            raise LeaseLostError(f"lease of {ref} lost: epoch not written")

    # --- history -----------------------------------------------------------------------------
    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append to the audit history, chained to the entry before (`rotator.audit`), and to the
        key's last-rotation slot and the shared counters, in one script. The chain's head this
        process saw last is tried first (one round trip); when another process wrote since, the
        script answers the head it holds and the entry is hashed again after it. Returns the entry
        as stored (with `seq`, `prev`, `hash`)."""
        from rotator.audit import GENESIS, KEYED, chained

        keys = [self._k("history", "head"), self._k("history")]
        increments: list[Any] = []
        if entry.get("client_id") and entry.get("key_id") and entry.get("kind") == "rotation":
            keys.append(self._k("last", f"{entry['client_id']}/{entry['key_id']}"))
            keys += [self._k("metrics", "rotations"), self._k("metrics", "duration")]
            increments += [4, str(entry.get("status")), 1, 0]
            seconds = (entry.get("timings") or {}).get("total_s")
            if isinstance(seconds, int | float):
                increments += [x for bound in DURATION_BUCKETS if seconds <= bound
                               for x in (5, f"le:{bound}", 1, 0)]
                increments += [5, "count", 1, 0, 5, "sum", float(seconds), 1]
        last = 3 if len(keys) > 2 else 0
        with self._head_lock:
            for tries in range(200):
                if tries >= 3:  # writers racing: let the others through
                    time.sleep(random.uniform(0, 0.001 * min(tries, 20)))
                seen, prev, alg = parse_head(self._head) or (0, GENESIS, "")
                if alg == KEYED and self.audit_key is None:  # an unkeyed entry here would read as forged
                    log.error("audit.key_missing", head_seq=seen)
                    raise RotatorError("the audit history is keyed (audit.hmac_key_file) and this process has no "
                                       "key: the entry was not written; give it the same audit.hmac_key_file")
                stored = chained(entry, seen + 1, prev, self.audit_key)
                head = f"{stored['seq']}:{stored['hash']}:{stored['alg']}"
                args = [self._head, json.dumps(stored, sort_keys=True), head, self.history_max, last, *increments]
                done, current = self.client.eval(_APPEND_CHAINED, len(keys), *keys, *args)
                if int(done) == 1:
                    self._head = head
                    return stored
                if self._head and not current:  # the head this process saw is gone: the chain starts again
                    log.error("audit.chain_restarted", seen_head=self._head.partition(":")[0])
                self._head = str(current or "")
        raise RotatorError("the audit history's head kept moving: 200 appends lost the race in a row")

    def mark_stored_rotation(self, ref: KeyRef, replaced: str, when: float) -> None:
        self.client.set(self._k("stored", str(ref)), _stored_slot(replaced, when))

    def stored_rotation(self, ref: KeyRef) -> dict[str, Any] | None:
        raw = self.client.get(self._k("stored", str(ref)))
        return json.loads(raw) if raw else None

    def put_pending_reload(self, told: dict[str, Any]) -> None:
        """The reload hooks are about to be told of a stored rotation (`told`, no secret): kept until
        they were, so that a worker that dies meanwhile leaves them to the recovery sweep."""
        self.client.hset(self._k("reload"), f"{told['client_id']}/{told['key_id']}", json.dumps(told, sort_keys=True))

    def pending_reloads(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.client.hvals(self._k("reload")):
            try:
                told = json.loads(raw)
            except ValueError:
                continue
            if isinstance(told, dict) and all(isinstance(told.get(name), str) for name in ("client_id", "key_id")):
                found.append(told)
        return found

    def drop_pending_reload(self, told: dict[str, Any]) -> None:
        """Only that rotation's: a later one of the same key, pending meanwhile, stays."""
        self.client.eval(_DROP_IF_SAME, 1, self._k("reload"), f"{told['client_id']}/{told['key_id']}",
                         json.dumps(told, sort_keys=True))

    def lineage_links(self, client_id: str) -> dict[str, dict[str, Any]]:
        """The alias-template mode's proved lineage of a Client ID's keys: key id -> {"base",
        "replaces", "replaced_by"} (`rotator.engine.successors`); a cache of what the sinks and the
        creates' answers prove, rebuilt from them when lost."""
        raw = self.client.hgetall(self._k("lineage", client_id))
        links: dict[str, dict[str, Any]] = {}
        for key_id, value in raw.items():
            try:
                entry = json.loads(value)
            except ValueError:
                continue
            if isinstance(entry, dict):
                links[key_id.decode() if isinstance(key_id, bytes) else str(key_id)] = entry
        return links

    def put_lineage_links(self, client_id: str, links: dict[str, dict[str, Any]], how: str = "merge") -> None:
        """`merge`: each entry's fields over the stored ones, the others kept (a proof never drops a
        link written since it was read); `new`: only where no entry is (a key proved to be its own
        base)."""
        if not links:
            return
        args = [how] + [part for key_id, entry in links.items() for part in (key_id, json.dumps(entry, sort_keys=True))]
        self.client.eval(_PUT_LINKS, 1, self._k("lineage", client_id), *args)

    def drop_lineage_links(self, client_id: str, key_ids: list[str]) -> None:
        """Forget keys that are gone: their entries, and every other entry's link to them (atomic:
        a link written meanwhile is never undone by a stale read)."""
        if key_ids:
            self.client.eval(_DROP_LINKS, 1, self._k("lineage", client_id), *key_ids)

    def metrics(self) -> dict[str, Any]:
        """Shared counters every worker process adds to (so a scrape sees all of them)."""
        pipe = self.client.pipeline(transaction=False)  # reads: a read-only user may not MULTI
        pipe.hgetall(self._k("metrics", "rotations"))
        pipe.hgetall(self._k("metrics", "duration"))
        pipe.get(self._k("last_scan"))
        rotations, duration, last_scan = pipe.execute()
        return {"rotations": {str(k): int(v) for k, v in rotations.items()},
                "duration": {str(k): float(v) for k, v in duration.items()},
                "last_scan": float(last_scan) if last_scan else None}

    # --- the fleet view the workers publish (rotator.view) -------------------------------------
    def put_view(self, view: str, gauges: str, published_at: float, ttl_s: int) -> None:
        """The view and its gauges expire after `ttl_s`; when it was published stays (a stale view
        stays visible as one)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k("view"), view, ex=max(60, ttl_s))
        pipe.set(self._k("view", "gauges"), gauges, ex=max(60, ttl_s))
        pipe.set(self._k("view", "published_at"), published_at)
        pipe.execute()

    def view(self) -> str | None:
        return self._text(self.client.get(self._k("view")))

    def has_view(self) -> bool:
        return bool(self.client.exists(self._k("view")))

    def view_gauges(self) -> str | None:
        return self._text(self.client.get(self._k("view", "gauges")))

    @staticmethod
    def _text(raw: bytes | str | None) -> str | None:
        return raw.decode() if isinstance(raw, bytes) else raw

    def view_published_at(self) -> float | None:
        raw = self.client.get(self._k("view", "published_at"))
        return float(raw) if raw is not None else None

    # --- signed task messages (rotator.gate) ---------------------------------------------------
    def consumed(self, mid: str) -> bool:
        """Whether a task message with this signed message id was acknowledged already."""
        return bool(self.client.exists(self._k("msg", mid)))

    def mark_consumed(self, mid: str, ttl_s: int) -> None:
        """Kept as long as the message could still pass the age check, then it expires with it."""
        self.client.set(self._k("msg", mid), "1", ex=max(1, ttl_s))

    def count_refused(self, reason: str) -> None:
        self.client.hincrby(self._k("metrics", "refused"), reason, 1)

    def count_unsigned_accepted(self) -> None:
        self.client.incr(self._k("metrics", "unsigned_accepted"))

    def unsigned_accepted(self) -> int:
        """Unsigned task messages run by a worker in `signing.mode = "transition"`."""
        return int(self.client.get(self._k("metrics", "unsigned_accepted")) or 0)

    def refused(self) -> dict[str, int]:
        """Task messages refused by a worker's gate, by reason."""
        return {str(k): int(v) for k, v in self.client.hgetall(self._k("metrics", "refused")).items()}

    def mark_scan(self, when: float) -> None:
        self.client.set(self._k("last_scan"), when)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.client.lrange(self._k("history"), 0, limit - 1)]

    def audit_keyed(self) -> bool:
        """Whether the audit chain's head entry is keyed with the HMAC key."""
        from rotator.audit import KEYED

        head = parse_head(self.client.get(self._k("history", "head")))
        return head is not None and head[2] == KEYED

    def audit_snapshot(self) -> tuple[list[dict[str, Any]], tuple[int, str, str] | None]:
        """The whole history Redis keeps (newest first) and the audit chain's head (`seq`, hash,
        `alg`; None before its first entry). The head is read first and entries appended after it
        are left out, so the two agree without a transaction (which a read-only user may not open)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self._k("history", "head"))
        pipe.lrange(self._k("history"), 0, -1)
        raw_head, raw_entries = pipe.execute()
        head = parse_head(raw_head)
        entries = [json.loads(x) for x in raw_entries]
        last = head[0] if head is not None else 0
        return [e for e in entries if not isinstance(e.get("seq"), int) or e["seq"] <= last], head

    def last_rotation(self, ref: KeyRef) -> dict[str, Any] | None:
        raw = self.client.get(self._k("last", str(ref)))
        return json.loads(raw) if raw else None


def parse_head(raw: object) -> tuple[int, str, str] | None:
    """The audit chain's head as stored (`seq:hash:alg`): `seq`, hash, `alg`; None when there is none."""
    seq, digest, alg, *_ = [*str(raw or "").split(":"), "", ""]
    return (int(seq), digest, alg) if seq.isdigit() and digest else None


def _stored_slot(replaced: str, when: float, held: tuple[str, list[str]] | None = None) -> str:
    """The stored-rotation slot: the generation rotator's stored rotation replaced, and when; with
    `held`, the generation it stored and the sinks that hold it (a reader of an older slot finds
    neither, and takes nothing for stored)."""
    extra = {"generation": held[0], "sinks": held[1]} if held is not None else {}
    return json.dumps({"replaced": replaced, "time": when, **extra})
