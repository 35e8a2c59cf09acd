"""Durable state in Redis: attempt records, per-key leases, rotation history, once-only markers.

Everything lives under one namespace. Secrets never enter Redis: records hold ids, times and
fingerprints only.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import redis

from rotator.domain import AttemptRecord, KeyRef

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Lease:
    """A lock with an owner token: extended while work goes on, released only by its owner."""

    def __init__(self, client: redis.Redis, name: str, token: str, ttl_ms: int) -> None:
        self._client = client
        self.name = name
        self.token = token
        self.ttl_ms = ttl_ms
        self._stop = threading.Event()

    def extend(self) -> bool:
        return bool(self._client.eval(_EXTEND, 1, self.name, self.token, self.ttl_ms))

    def release(self) -> bool:
        self._stop.set()
        return bool(self._client.eval(_RELEASE, 1, self.name, self.token))

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[Lease]:
        """Extend every third of the TTL in a thread until the block ends, then release."""

        def beat() -> None:
            while not self._stop.wait(self.ttl_ms / 3000):
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
    def __init__(self, client: redis.Redis, namespace: str = "rotator", history_max: int = 1000) -> None:
        self.client = client
        self.ns = namespace
        self.history_max = history_max

    @classmethod
    def from_url(cls, url: str, namespace: str = "rotator", history_max: int = 1000) -> RedisState:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                        health_check_interval=30), namespace, history_max)

    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    # --- leases ------------------------------------------------------------------------------
    def acquire(self, name: str, ttl_s: float) -> Lease | None:
        key = self._k("lock", name)
        token = secrets.token_hex(16)
        ttl_ms = int(ttl_s * 1000)
        if self.client.set(key, token, nx=True, px=ttl_ms):
            return Lease(self.client, key, token, ttl_ms)
        return None

    def once(self, name: str, ttl_s: int) -> bool:
        """True the first time `name` is claimed within `ttl_s` (one beat, one alert)."""
        return bool(self.client.set(self._k("once", name), "1", nx=True, ex=max(1, ttl_s)))

    # --- attempt records -------------------------------------------------------------------
    def save_attempt(self, attempt: AttemptRecord) -> None:
        ref = f"{attempt.client_id}/{attempt.key_id}"
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._k("attempt", ref), json.dumps(asdict(attempt)))
        pipe.sadd(self._k("attempts"), ref)
        pipe.execute()

    def get_attempt(self, ref: KeyRef) -> AttemptRecord | None:
        raw = self.client.get(self._k("attempt", str(ref)))
        return AttemptRecord(**json.loads(raw)) if raw else None

    def delete_attempt(self, attempt: AttemptRecord) -> None:
        ref = f"{attempt.client_id}/{attempt.key_id}"
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._k("attempt", ref))
        pipe.srem(self._k("attempts"), ref)
        pipe.execute()

    def attempts(self) -> list[AttemptRecord]:
        out = []
        for ref in sorted(str(r) for r in self.client.smembers(self._k("attempts"))):
            client_id, _, key_id = ref.partition("/")
            found = self.get_attempt(KeyRef(client_id, key_id))
            if found:
                out.append(found)
        return out

    # --- history -----------------------------------------------------------------------------
    def record(self, entry: dict[str, Any]) -> None:
        """Append to the global audit history and the key's last-rotation slot (bounded)."""
        text = json.dumps(entry, sort_keys=True)
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self._k("history"), text)
        pipe.ltrim(self._k("history"), 0, self.history_max - 1)
        if entry.get("client_id") and entry.get("key_id") and entry.get("kind") == "rotation":
            pipe.set(self._k("last", f"{entry['client_id']}/{entry['key_id']}"), text)
            pipe.hincrby(self._k("metrics", "rotations"), str(entry.get("status")), 1)
            seconds = (entry.get("timings") or {}).get("total_s")
            if isinstance(seconds, int | float):
                for bound in DURATION_BUCKETS:
                    if seconds <= bound:
                        pipe.hincrby(self._k("metrics", "duration"), f"le:{bound}", 1)
                pipe.hincrby(self._k("metrics", "duration"), "count", 1)
                pipe.hincrbyfloat(self._k("metrics", "duration"), "sum", float(seconds))
        pipe.execute()

    def metrics(self) -> dict[str, Any]:
        """Shared counters every worker process adds to (so a scrape sees all of them)."""
        pipe = self.client.pipeline()
        pipe.hgetall(self._k("metrics", "rotations"))
        pipe.hgetall(self._k("metrics", "duration"))
        pipe.get(self._k("last_scan"))
        rotations, duration, last_scan = pipe.execute()
        return {"rotations": {str(k): int(v) for k, v in rotations.items()},
                "duration": {str(k): float(v) for k, v in duration.items()},
                "last_scan": float(last_scan) if last_scan else None}

    def mark_scan(self, when: float) -> None:
        self.client.set(self._k("last_scan"), when)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.client.lrange(self._k("history"), 0, limit - 1)]

    def last_rotation(self, ref: KeyRef) -> dict[str, Any] | None:
        raw = self.client.get(self._k("last", str(ref)))
        return json.loads(raw) if raw else None
