"""A deterministic simulation of rotator's attempt protocol under adversarial faults.

The real `Engine` runs against in-process fakes of the key service, the sinks and Redis, in
several "worker" threads of which exactly one runs at a time: every call into a fake is a step
at which a seeded scheduler picks who runs next, may advance a virtual clock, crash the worker
(its lease stays until its TTL), freeze it past its lease (its heartbeat stops), or make the
call misbehave. The same seed replays the same run, step for step.

    python -m tests.sim --seeds 100000        # a long run on demand
    python -m tests.sim --seed 1234 --trace   # replay one seed with its event trace

After the chaos, every fault is healed, the clock moves past the horizon and recovery runs until
quiet; then the invariants are checked (see `check`). Half the runs rotate by the overlap strategy,
and half of those against the contract as published (no successor links on the wire, unique
aliases): the alias-template mode.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any

import httpx

from rotator.aliases import AliasTemplate
from rotator.domain import (
    ApiKey,
    AttemptRecord,
    Environment,
    Generation,
    IssuedKey,
    KeyRef,
    ReplayAnswer,
    Scope,
    Secret,
)
from rotator.engine import INLINE, Engine
from rotator.engine.successors import AliasSuccessors, creates_of
from rotator.errors import BudgetSpent, InDoubtError, NotFoundError, PermanentError, TransientError
from rotator.events import CapturePublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice.http import HttpKeyService
from rotator.policy import Policy
from rotator.protocols import SecretRecord, StoredState
from rotator.sinks.base import encode, refuse_if_stale, secret_from_document, state_from_document
from rotator.state import LeaseLostError

FP = Fingerprinter("simulation-fingerprint-key-0123")
DAY = 86_400.0
TTL_S = 10.0
HORIZON_S = 90.0
REPLAY_TTL_S = 24 * 3600
GRACE_S = 600.0  # the overlap strategy's grace, short enough for the chaos to cross it


class Crash(BaseException):
    """The worker process dies here (not an Exception: nothing in the engine may catch it)."""


class Violation(AssertionError):
    pass


# --- the scheduler -----------------------------------------------------------------------------
@dataclass
class Worker:
    name: str
    go: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    done: bool = False
    crashed: bool = False
    frozen_until: float = 0.0  # process paused (GC, VM freeze): no heartbeat
    asleep_until: float = 0.0  # sleeping in a retry back-off: heartbeat goes on
    result: Any = None
    error: BaseException | None = None


class Sim:
    """One seeded run: the clock, the faults, the workers and the trace."""

    def __init__(self, seed: int, *, chaos: bool = True) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.fault_scale = 1.0  # every fault's probability, scaled (the long run's are rarer)
        self.now = 1_800_000_000.0
        self.chaos = chaos
        self.trace: list[str] = []
        self.workers: list[Worker] = []
        self._current: Worker | None = None
        self._back = threading.Semaphore(0)
        self._local = threading.local()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.state = FakeState(self)
        self.service = FakeKeyService(self)
        self.sinks = [FakeSink(self, "vault"), FakeSink(self, "aws")]
        self.events = CapturePublisher()
        self.durable = False  # Redis loses nothing in this run
        self.overlap = False  # keys rotate by the overlap strategy (successor, grace, revoke)
        self.redis_lost = False  # Redis restarted empty: the grace falls back to the creation date
        self.service.sinks = self.sinks
        self.service.grace_s = GRACE_S

    # -- time and faults
    def log(self, text: str) -> None:
        self.trace.append(f"{self.now - 1_800_000_000.0:9.3f} {self.me().name if self.me() else '-':>10} {text}")

    def me(self) -> Worker | None:
        return getattr(self._local, "worker", None)

    def chance(self, p: float) -> bool:
        return self.chaos and self.rng.random() < p * self.fault_scale

    def at(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.timers.append((self.now + delay_s, next(self._seq), fn))

    def point(self, what: str) -> None:
        """A step of the current worker: it may crash or freeze here; then another may run."""
        worker = self.me()
        self.log(what)
        if worker is None:
            return
        if self.chance(0.02):
            self.log("CRASH")
            raise Crash(what)
        if self.chance(0.01):
            worker.frozen_until = self.now + TTL_S * self.rng.uniform(1.1, 3.0)
            self.log(f"FREEZE until {worker.frozen_until - 1_800_000_000.0:.1f}")
        self._yield(worker)

    def sleep(self, seconds: float) -> None:
        worker = self.me()
        if worker is None:
            self.now += seconds
            return
        worker.asleep_until = self.now + seconds
        self._yield(worker)

    def _yield(self, worker: Worker) -> None:
        self._back.release()
        worker.go.acquire()

    # -- workers
    def spawn(self, name: str, fn: Callable[[], Any]) -> Worker:
        worker = Worker(name)

        def body() -> None:
            worker.go.acquire()
            self._local.worker = worker
            try:
                worker.result = fn()
            except Crash:
                worker.crashed = True
            except BaseException as exc:  # an engine exception is a finding: keep it for the report
                worker.error = exc
                self.log(f"EXCEPTION {type(exc).__name__}: {exc}")
            finally:
                worker.done = True
                self._back.release()

        threading.Thread(target=body, name=name, daemon=True).start()
        self.workers.append(worker)
        return worker

    def run(self, max_steps: int = 20_000) -> None:
        """Drive every live worker to its end, one step at a time."""
        for _ in range(max_steps):
            self._fire_timers()
            live = [w for w in self.workers if not w.done]
            if not live:
                return
            ready = [w for w in live if w.frozen_until <= self.now and w.asleep_until <= self.now]
            if not ready:
                wake = min(max(w.frozen_until, w.asleep_until) for w in live)
                next_timer = min((t for t, _, _ in self.timers), default=wake)
                self._advance(max(min(wake, next_timer), self.now) - self.now)
                continue
            worker = self.rng.choice(ready)
            self._advance(self.rng.uniform(0.0, 0.5))
            worker.go.release()
            self._back.acquire()
        raise Violation(f"seed {self.seed}: did not finish in {max_steps} steps")

    def _advance(self, seconds: float) -> None:
        self.now += seconds
        # Live, unfrozen workers' heartbeats keep their leases.
        for lease in list(self.state.leases):
            owner = lease.owner
            if owner is not None and not owner.done and owner.frozen_until <= self.now:
                lease.beat()

    def _fire_timers(self) -> None:
        self.timers.sort()
        while self.timers and self.timers[0][0] <= self.now:
            _, _, fn = self.timers.pop(0)
            fn()


# --- the key service ---------------------------------------------------------------------------
@dataclass
class FakeKey:
    created_at: int
    last_reset_at: int | None
    secret: str
    alias: str = ""
    replaces: str | None = None  # the overlap strategy's links, as the contract's Replaces/ReplacedBy
    replaced_by: str | None = None
    client_id: str = "sim"
    base: str = ""  # the lineage's base alias, as the oracle knows it (the place consumers read)

    @property
    def generation(self) -> Generation:
        return Generation(self.created_at, self.last_reset_at if self.last_reset_at is not None else self.created_at)


class FakeKeyService:
    """docs/keyservice-api.md's rules, in memory: one run per Idempotency-Key, its answer stored for
    24 h (whatever it was) and every later POST with that key blocked with a 409; faults chosen by
    the seed. Key reads, writes and replays reach it through the real HTTP adapter."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.keys: dict[str, FakeKey] = {}
        self.stored: dict[str, tuple[float, str, int, IssuedKey | None]] = {}  # ik -> (date, key, status, answer)
        self.pending: set[str] = set()  # Idempotency-Keys whose call is running at the origin
        self.keys_seen: set[str] = set()  # every Idempotency-Key that reached the service (none may leak)
        self.issued: dict[str, tuple[float, str, int, IssuedKey | None]] = {}
        self.previous: dict[str, tuple[int | None, float]] = {}  # key -> (LastResetDate before, when)
        self.ledger: list[tuple[str, Generation, str]] = []  # (key id, generation replaced, ik)
        self.creates: list[tuple[str, Generation, str, str]] = []  # (replaced key, its generation, ik, new key)
        self.revoked: dict[str, tuple[FakeKey, float]] = {}
        self.links_before: dict[str, tuple[str | None, float]] = {}  # key -> (ReplacedBy before, when)
        self.sinks: list[FakeSink] = []  # what consumers read: a revoke is checked against it
        self.grace_s = 0.0
        self.faulty = True
        self.spent_until: dict[str, float] = {}  # Client ID -> until when its rate budget is spent
        self.client_of: dict[str, str] = {}  # key id -> its Client ID (revoked keys' too)
        # Without the successor extension (the contract as published), the wire carries no links and
        # aliases are unique; the links above are the oracle's truth, from what each create was for.
        self.successors = True
        self.intent: dict[str, str] = {}  # Idempotency-Key -> the key its create replaces (the engine's intent)
        self.http = HttpKeyService("https://keys.example.com", "sim-token", max_attempts=1, timeout_s=3600,
                                   clock_skew_s=10 * 365 * DAY, transport=httpx.MockTransport(self._wire))

    def add(self, key_id: str, created_at: int, client_id: str = "sim") -> None:
        self.keys[key_id] = FakeKey(created_at, None, f"seed-secret-{key_id}", f"alias {key_id}", client_id=client_id,
                                    base=f"alias {key_id}")
        self.client_of[key_id] = client_id

    def _api_key(self, key_id: str, replaced_by: str | bool | None = False) -> ApiKey:
        k = self.keys[key_id]
        link = k.replaced_by if replaced_by is False else replaced_by
        if not self.successors:  # the published contract: no links on the wire
            return ApiKey(k.client_id, key_id, k.alias, Environment.PRODUCTION, (), k.created_at, k.last_reset_at)
        return ApiKey(k.client_id, key_id, k.alias, Environment.PRODUCTION, (), k.created_at, k.last_reset_at,
                      replaces=k.replaces, replaced_by=link if isinstance(link, str) else None)

    def _p(self, p: float) -> bool:
        return self.faulty and self.sim.chance(p)

    def _budget(self, client_id: str) -> None:
        """The fleet's share of this Client ID's rate limit, spent until a time the run chose."""
        until = self.spent_until.get(client_id, 0.0)
        if self.sim.now < until:
            raise BudgetSpent(client_id, until, "the fleet's share of the rate limit is spent")

    # KeyService
    def list_clients(self) -> Iterator[Any]:
        return iter(())

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        self.sim.point("ks list")
        self._budget(client_id)
        return iter([self._api_key(k) for k in sorted(self.keys) if self.keys[k].client_id == client_id])

    def get_key(self, client_id: str, key_id: str) -> ApiKey:
        self.sim.point(f"ks get {key_id}")
        self._budget(client_id)
        return self.http.get_key(client_id, key_id)

    def _read_key(self, key_id: str) -> httpx.Response:
        if self._p(0.03):
            return _error(503, "internal_error")
        if key_id not in self.keys:
            return _error(404, "ressource_not_found")
        key = self._api_key(key_id)
        previous = self.previous.get(key_id)
        link = self.links_before.get(key_id)
        if previous is not None and self.sim.now - previous[1] < 5.0 and self._p(0.3):  # a lagging replica
            self.sim.log(f"ks STALE READ of {key_id}")
            key = replace(key, last_reset_at=previous[0])
        elif link is not None and self.sim.now - link[1] < 5.0 and self._p(0.3):
            self.sim.log(f"ks STALE READ of {key_id}'s successor link")
            key = self._api_key(key_id, replaced_by=link[0])
        return httpx.Response(200, json=_key_json(key))

    def _run_reset(self, key_id: str, ik: str, seen: Generation) -> tuple[int, IssuedKey | None]:
        """The origin runs the reset (once per Idempotency-Key) and stores its answer. The ledger
        names the generation the request was sent for, so two resets sent for one generation
        count as two even when the second lands after the first (a late commit)."""
        key = self.keys.get(key_id)
        if key is None:
            self.stored[ik] = (self.sim.now, key_id, 404, None)
            return 404, None
        self.previous[key_id] = (key.last_reset_at, self.sim.now)
        replaced = seen
        previous = key.last_reset_at if key.last_reset_at is not None else key.created_at
        key.last_reset_at = max(int(self.sim.now), previous + 1)
        key.secret = f"live-secret-{self.sim.seed}-{len(self.ledger)}-{self.sim.rng.randrange(10**9)}"
        self.ledger.append((key_id, replaced, ik))
        self.sim.log(f"ks RESET {key_id} sent for {replaced} -> {key.generation} ik={ik[:10]}")
        answer = IssuedKey(self._api_key(key_id), Secret(key.secret))
        self.stored[ik] = (self.sim.now, key_id, 200, answer)
        self.issued[ik] = (self.sim.now, key_id, 200, answer)  # for the checks: never expires
        return 200, answer

    def _live(self, ik: str) -> bool:
        """A stored answer within its 24 h; an expired one is forgotten (the key can run again)."""
        found = self.stored.get(ik)
        if found is not None and self.sim.now - found[0] >= REPLAY_TTL_S:
            del self.stored[ik]
            return False
        return found is not None

    # The writes and the replays go through the real HTTP adapter, over an in-memory transport that
    # answers in the payment API's published wire format (docs/keyservice-api.md).
    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        self.sim.point(f"ks reset {key_id} ik={idempotency_key[:10]}")
        self._budget(client_id)
        return self.http.reset_key(client_id, key_id, idempotency_key)

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        self.sim.point(f"ks replay {key_id} ik={idempotency_key[:10]}")
        return self.http.replay(client_id, key_id, idempotency_key)

    def create_key(self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str,
                   replaces: str | None = None) -> IssuedKey:
        self.sim.point(f"ks create successor of {replaces} ik={idempotency_key[:10]}")
        return self.http.create_key(client_id, alias, scopes, idempotency_key, replaces=replaces)

    def replay_create(self, client_id: str, replaces: str, idempotency_key: str) -> ReplayAnswer:
        self.sim.point(f"ks replay create of {replaces} ik={idempotency_key[:10]}")
        return self.http.replay_create(client_id, replaces, idempotency_key)

    def _wire(self, request: httpx.Request) -> httpx.Response:
        """The key service's answers over the wire: the idempotent POSTs and the responses endpoint."""
        parts = request.url.path.split("/")[3:]  # after /v2.01/sim
        if request.method == "GET" and parts[0] == "responses":
            self.keys_seen.add(parts[1])
            return self._stored_response(parts[1])
        if request.method == "GET":
            return self._read_key(parts[1])
        ik = request.headers["Idempotency-Key"]
        self.keys_seen.add(ik)
        if parts[-1] == "reset":
            key_id = parts[1]
            seen = self.keys[key_id].generation if key_id in self.keys else Generation(0, 0)
            return self._post(ik, key_id, lambda: self._run_reset(key_id, ik, seen))
        body = json.loads(request.content)
        replaces, alias = body.get("Replaces") if self.successors else self.intent[ik], body["Alias"]
        seen = self.keys[replaces].generation if replaces in self.keys else Generation(0, 0)
        return self._post(ik, f"create:{replaces}", lambda: self._run_create(replaces, ik, seen, alias))

    def _post(self, ik: str, stored_as: str, run: Callable[[], tuple[int, IssuedKey | None]]) -> httpx.Response:
        """The contract's answers to one idempotent POST, faults drawn by the seed."""
        if ik in self.pending or self._live(ik):  # a used key is blocked, whatever its first answer was
            return _error(409, "idempotent_creation_conflict")
        roll = self.sim.rng.random() / self.sim.fault_scale if self.faulty and self.sim.chaos else 1.0
        if roll < 0.03:  # a gateway (rate limiter, WAF) refuses: the origin never sees it, stores nothing
            return _error(429, "rate_limit")
        if roll < 0.06:  # the origin refuses, and stores the refusal under the key
            self.stored[ik] = (self.sim.now, stored_as, 403, None)
            return _error(403, "forbidden_ressource")
        if roll < 0.08:  # the origin fails before it runs anything, and stores that 500: the key is spent
            self.stored[ik] = (self.sim.now, stored_as, 500, None)
            return _error(500, "internal_error")
        if roll < 0.12:
            return _error(502, "internal_error")  # from the gateway; the origin never saw it
        if roll < 0.20:  # a gateway gives up, the origin commits later (within its 60 s deadline)
            self.pending.add(ik)

            def commit() -> None:
                self.pending.discard(ik)
                run()

            self.sim.at(self.sim.rng.uniform(0.5, 60.0), commit)
            return _error(504, "internal_error")
        status, answer = run()
        self.sim.point(f"ks answered {stored_as}")
        if answer is None:
            return _error(status, "conflict" if status == 409 else "ressource_not_found")
        if roll < 0.25:
            raise httpx.ReadTimeout("no answer")  # a time-out, a dropped connection
        if roll < 0.30:
            return httpx.Response(200, content=json.dumps(_issued_json(answer)).encode()[:40])  # cut
        return httpx.Response(200, json=_issued_json(answer))

    def _stored_response(self, ik: str) -> httpx.Response:
        if self._p(0.05):
            return _error(503, "internal_error")
        if not self._live(ik):
            return _error(400, "correlationid_not_found")
        date, stored_as, status, answer = self.stored[ik]
        owner = self.client_of.get(stored_as.removeprefix("create:"), "sim")
        path = f"/V2.01/{owner}/apikeys" + ("" if stored_as.startswith("create:") else f"/{stored_as}/reset")
        resource = _issued_json(answer) if answer is not None else {"Type": "refused", "Message": "stored"}
        return httpx.Response(200, json={
            "StatusCode": str(status), "ContentLength": str(len(json.dumps(resource))),
            "ContentType": "application/json; charset=utf-8", "Date": formatdate(date, usegmt=True),
            "RequestURL": f"https://api.keyservice.example{path}", "Resource": resource})

    def _run_create(self, replaces: str, ik: str, seen: Generation, alias: str) -> tuple[int, IssuedKey | None]:
        """The origin creates the successor once per Idempotency-Key (the contract's rules: one live
        successor, no chains, the same alias); a conflict is a stored 409."""
        old = self.keys.get(replaces)
        if self.successors:
            refused = old is None or old.replaced_by is not None or alias != old.alias or (
                old.replaces is not None and old.replaces in self.keys)
        else:  # the published contract knows no successors: an alias taken is all it refuses
            refused = old is None or any(k.alias == alias for k in self.keys.values())
        if refused:
            self.stored[ik] = (self.sim.now, f"create:{replaces}", 409, None)
            return 409, None
        assert old is not None
        new_id = f"{replaces.split('.')[0]}.s{len(self.creates) + 1}"
        created = max(int(self.sim.now), old.created_at + 1)
        secret = f"live-secret-{self.sim.seed}-c{len(self.creates)}-{self.sim.rng.randrange(10**9)}"
        self.keys[new_id] = FakeKey(created, None, secret, alias, replaces=replaces, client_id=old.client_id,
                                    base=old.base)
        self.client_of[new_id] = old.client_id
        self.links_before[replaces] = (old.replaced_by, self.sim.now)
        old.replaced_by = new_id
        self.creates.append((replaces, seen, ik, new_id))
        self.sim.log(f"ks CREATE {new_id} replacing {replaces} ik={ik[:10]}")
        answer = IssuedKey(self._api_key(new_id), Secret(secret))
        self.stored[ik] = (self.sim.now, f"create:{replaces}", 200, answer)
        self.issued[ik] = (self.sim.now, new_id, 200, answer)
        return 200, answer

    def revoke_key(self, client_id: str, key_id: str) -> None:
        """Revoke; checked against what consumers read: never a key a sink still holds, never a
        replaced key before every sink holds its successor or before the successor's grace is over."""
        self.sim.point(f"ks revoke {key_id}")
        if self._p(0.05):
            raise TransientError("revoke: 503")
        key = self.keys.get(key_id)
        if key is None:
            raise NotFoundError("no such key")
        successor = self.keys.get(key.replaced_by) if key.replaced_by else None
        if self.unproved(key_id):
            raise Violation(f"seed {self.sim.seed}: {key_id} revoked, a key no answer ever proved rotator made")
        for sink in self.sinks:
            if sink.holds_doc_of(key.base, key_id, key.secret) or (
                    successor is not None and not sink.holds(key.base, successor.secret)):
                raise Violation(f"seed {self.sim.seed}: {key_id} revoked while {sink.name} still holds it "
                                "(or not its successor)")
        if successor is not None and self.sim.now < successor.created_at + self.grace_s:
            raise Violation(f"seed {self.sim.seed}: {key_id} revoked before its successor's grace was over")
        if successor is not None and not self.sim.redis_lost:  # the grace counts from when every sink held it
            served = max(s.first_held.get(successor.secret, self.sim.now) for s in self.sinks)
            if self.sim.now < served + self.grace_s:
                raise Violation(f"seed {self.sim.seed}: {key_id} revoked before its successor's grace was over "
                                "(counted from when every sink held it)")
        del self.keys[key_id]
        self.revoked[key_id] = (key, self.sim.now)
        if successor is not None:
            successor.replaces = None
        if key.replaces is not None and key.replaces in self.keys:  # an orphan successor
            self.links_before[key.replaces] = (key_id, self.sim.now)
            self.keys[key.replaces].replaced_by = None
        self.sim.log(f"ks REVOKE {key_id}")
        if self._p(0.05):
            raise InDoubtError("revoke: no answer (it ran)")

    def verify_secret(self, client_id: str, secret: Secret, key_id: str | None = None) -> bool:
        self.sim.point("ks verify")
        if self._p(0.03):
            raise TransientError("token: 503")
        return any(k.secret == secret.reveal() for k in self.keys.values())

    def revoke_by_person(self, key_id: str) -> None:
        """A person revokes a key at the key service (a leaked old key, say), checks or not."""
        key = self.keys.pop(key_id, None)
        if key is None:
            return
        self.revoked[key_id] = (key, self.sim.now)
        if key.replaced_by is not None and key.replaced_by in self.keys:
            self.keys[key.replaced_by].replaces = None
        self.sim.log(f"ks PERSON REVOKES {key_id}")

    def unproved(self, key_id: str) -> bool:
        """Without successors: a key a create made that nothing durable ever named (no link in
        Redis, no attempt record, no sink document) and whose stored answer is gone (a day passed):
        nothing can prove it rotator's, so it is never revoked, and nobody holds its secret."""
        if self.successors or key_id in self.sim.state.known:
            return False
        return any(new == key_id and not self._answers(ik, key_id) for *_, ik, new in self.creates)

    def _answers(self, ik: str, key_id: str) -> bool:
        """The key service still keeps, under `ik`, the answer that created `key_id`."""
        if not self._live(ik):
            return False
        answer = self.stored[ik][3]
        return answer is not None and answer.key.key_id == key_id

    def lineages(self) -> dict[str, list[str]]:
        """Live keys by base alias (the overlap strategy's successor shares its predecessor's place)."""
        found: dict[str, list[str]] = {}
        for key_id in sorted(self.keys):
            if not self.unproved(key_id):
                found.setdefault(self.keys[key_id].base, []).append(key_id)
        return found

    def close(self) -> None:
        return None


def _error(status: int, kind: str) -> httpx.Response:
    return httpx.Response(status, json={"Message": kind, "Type": kind, "Id": "sim", "Date": 1_800_000_000,
                                        "errors": None}, headers={"Retry-After": "1"} if status == 429 else None)


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {"Id": key.key_id, "ClientId": key.client_id, "Alias": key.alias, "IsAutoGenerated": False,
            "Environment": key.environment.value, "Scopes": [], "CreationDate": key.created_at,
            "LastResetDate": key.last_reset_at, "Status": "ACTIVE", "Replaces": key.replaces,
            "ReplacedBy": key.replaced_by}


def _issued_json(issued: IssuedKey) -> dict[str, Any]:
    return {**_key_json(issued.key), "Secret": issued.secret.reveal()}


# --- sinks -------------------------------------------------------------------------------------
class FakeSink:
    """A versioned store shared by every worker (like one Vault), with the real stale-writer rule;
    it may be down, fail a write, hang in one, or acknowledge a write and lose it."""

    kind = "fake"
    transient_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, sim: Sim, name: str) -> None:
        self.sim = sim
        self.name = name
        self.docs: dict[str, list[str]] = {}  # by base alias: a successor takes its predecessor's place
        self.first_held: dict[str, float] = {}  # secret -> when this place first served it
        self.down_until = 0.0  # an outage: every write fails until then
        self.faulty = True

    def _p(self, p: float) -> bool:
        return self.faulty and self.sim.chance(p)

    def describe(self, ref: KeyRef | None = None) -> str:
        return f"{self.name}" + (f" [{ref}]" if ref else "")

    def location(self, key: ApiKey) -> str:
        return f"{self.name}:{key.base_alias}"

    def prepare(self, key: ApiKey) -> None:
        self.sim.point(f"{self.name} prepare {key.key_id}")
        if self._p(0.05):
            raise TransientError(f"{self.name}: down")

    def write(self, record: SecretRecord, prepared: object = None) -> StoredState:
        self.sim.point(f"{self.name} write {record.key.key_id}")
        if self._p(0.03):  # hangs, then goes on (the worker's heartbeat keeps its lease meanwhile)
            self.sim.log(f"{self.name} HANGS")
            self.sim.sleep(self.sim.rng.uniform(1.0, 30.0))
        if self._p(0.10) or self.sim.now < self.down_until:
            raise TransientError(f"{self.name}: 503")
        if self._p(0.02):
            raise PermanentError(f"{self.name}: 400")
        versions = self.docs.setdefault(record.key.base_alias, [])
        current = self._state(versions, record.key, writing=True)
        if refuse_if_stale(current, record, self.name):
            assert current is not None
            return current
        if self._p(0.03):
            self.sim.log(f"{self.name} LOSES the write")
        else:
            versions.append(encode(record))
            self.first_held.setdefault(record.secret.reveal(), self.sim.now)
            self.sim.state.known.add(record.key.key_id)
        self.sim.point(f"{self.name} write acknowledged {record.key.key_id}")
        return StoredState(record.fingerprint, record.attempt_id, None, record.key_reset_at)

    def annotate(self, record: SecretRecord) -> None:
        self.sim.point(f"{self.name} annotate")

    def read_state(self, key: ApiKey) -> StoredState | None:
        self.sim.point(f"{self.name} read {key.key_id}")
        if self._p(0.02):
            raise TransientError(f"{self.name}: read 503")
        return self._state(self.docs.get(key.base_alias, []), key)

    def read_secret(self, key: ApiKey) -> Secret | None:
        import json

        self.sim.point(f"{self.name} read secret {key.key_id}")
        if self._p(0.02):
            raise TransientError(f"{self.name}: read 503")
        versions = self.docs.get(key.base_alias, [])
        return secret_from_document(json.loads(versions[-1]), self.name, key) if versions else None

    def holds(self, alias: str, secret: str) -> bool:
        """What consumers read at this place is `secret`."""
        state = self._state(self.docs.get(alias, []))
        return state is not None and state.fingerprint == FP(secret)

    def holds_doc_of(self, alias: str, key_id: str, secret: str) -> bool:
        """Consumers at this place read `key_id`'s document with its live secret."""
        state = self._state(self.docs.get(alias, []))
        return state is not None and state.key_id in (None, key_id) and state.fingerprint == FP(secret)

    def _state(self, versions: list[str], key: ApiKey | None = None, writing: bool = False) -> StoredState | None:
        import json

        if not versions:
            return None
        return state_from_document(json.loads(versions[-1]), FP, self.name, key=key, writing=writing)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None


# --- Redis ---------------------------------------------------------------------------------------
class FakeLease:
    def __init__(self, state: FakeState, name: str, token: str, owner: Worker | None) -> None:
        self.state = state
        self.name = name
        self.token = token
        self.owner = owner
        self.lost = False

    def held(self) -> bool:
        entry = self.state.locks.get(self.name)
        return entry is not None and entry[0] == self.token and entry[1] >= self.state.sim.now

    def beat(self) -> None:
        if self.held():
            self.state.locks[self.name] = (self.token, self.state.sim.now + TTL_S, self.owner)
        else:
            self.lost = True

    def check(self) -> None:
        if self.lost or not self.held():
            self.lost = True
            raise LeaseLostError(f"lease {self.name} lost")

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[FakeLease]:
        self.state.leases.append(self)
        crashed = False
        try:
            yield self
        except Crash:
            crashed = True  # a dead process releases nothing: its lease runs out
            raise
        finally:
            self.state.leases.remove(self)
            if not crashed and self.held():
                del self.state.locks[self.name]


class FakeState:
    """Redis as the engine uses it: fenced records, leases on the virtual clock, epochs, history.
    It can lose an acknowledged write and restart empty."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.locks: dict[str, tuple[str, float, Worker | None]] = {}
        self.leases: list[FakeLease] = []
        self.records: dict[KeyRef, AttemptRecord] = {}
        self.written: list[str] = []  # every record as stored (JSON, as in Redis): searched for leaks
        self.epochs: dict[KeyRef, tuple[str, int]] = {}
        self.last: dict[KeyRef, dict[str, Any]] = {}
        self.stored_slots: dict[KeyRef, dict[str, Any]] = {}
        self.links: dict[str, dict[str, dict[str, Any]]] = {}  # the alias-template mode's proved lineages
        self.known: set[str] = set()  # key ids a link or a record ever named durably (and the sinks' documents)
        self.entries: list[dict[str, Any]] = []
        self.marks: set[str] = set()
        self.faulty = True
        self.may_lose = True
        self.clock_offset = 0.0
        self._tokens = itertools.count()
        self.on_delete: Callable[[AttemptRecord], None] = lambda record: None

    def restart_empty(self) -> None:
        self.sim.log("REDIS RESTARTS EMPTY")
        self.sim.redis_lost = True
        self.locks.clear()
        self.records.clear()
        self.epochs.clear()
        self.last.clear()
        self.stored_slots.clear()
        self.links.clear()
        self.marks.clear()

    def _lose(self) -> bool:
        if self.faulty and self.may_lose and self.sim.chance(0.02):
            self.sim.log("REDIS LOSES the write")
            self.sim.redis_lost = True
            return True
        return False

    def now(self) -> float:  # Redis TIME: may jump ahead of the world (an NTP step, a failover)
        return self.sim.now + self.clock_offset

    def acquire(self, name: str, ttl_s: float) -> FakeLease | None:
        self.sim.point(f"redis acquire {name}")
        entry = self.locks.get(name)
        if entry is not None and entry[1] >= self.sim.now:
            owner = entry[2]
            if not (owner is not None and owner.crashed and self.sim.chance(0.5)):  # dead owner on this host
                return None
        token = f"t{next(self._tokens)}"
        self.locks[name] = (token, self.sim.now + TTL_S, self.sim.me())
        return FakeLease(self, name, token, self.sim.me())

    def once(self, name: str, ttl_s: int) -> bool:
        fresh = name not in self.marks
        self.marks.add(name)
        return fresh

    def seen(self, name: str) -> bool:
        return name in self.marks

    def _fenced(self, lease: FakeLease, what: str) -> None:
        self.sim.point(f"redis {what}")
        if not lease.held():
            lease.lost = True
            raise LeaseLostError(f"{what}: lease lost")

    def save_attempt(self, attempt: AttemptRecord, lease: FakeLease) -> None:
        self._fenced(lease, f"save {attempt.key_id} {attempt.phase}")
        if not self._lose():
            stored = json.dumps(attempt.to_dict())  # what Redis holds; read back as a worker would
            self.written.append(stored)
            self.known.update([attempt.issued_key_id] if attempt.issued_key_id else [])
            self.records[attempt.ref] = AttemptRecord.from_dict(json.loads(stored))

    def get_attempt(self, ref: KeyRef) -> AttemptRecord | None:
        self.sim.point(f"redis get {ref.key_id}")
        return self.records.get(ref)

    def key_state(self, ref: KeyRef) -> tuple[AttemptRecord | None, dict[str, Any] | None]:
        self.sim.point(f"redis get {ref.key_id}")
        return self.records.get(ref), self.stored_slots.get(ref)

    def delete_attempt(self, attempt: AttemptRecord, lease: FakeLease, stored_at: float | None = None,
                       held: tuple[str, list[str]] | None = None) -> None:
        if stored_at is not None:  # sent before the fenced delete, and written whatever the fence says
            self.mark_stored_rotation(attempt.ref, attempt.generation, stored_at)
            if held is not None:
                self.stored_slots[attempt.ref] |= {"generation": held[0], "sinks": held[1]}
        self._fenced(lease, f"delete {attempt.key_id}")
        current = self.records.get(attempt.ref)
        if current is not None and current.attempt_id != attempt.attempt_id:
            raise LeaseLostError("the record belongs to another attempt")
        self.on_delete(attempt)
        self.records.pop(attempt.ref, None)

    def attempts(self) -> list[AttemptRecord]:
        self.sim.point("redis attempts")
        return [self.records[r] for r in sorted(self.records, key=str)]

    def epoch_and_now(self, ref: KeyRef, generation: str) -> tuple[int, float]:
        stored = self.epochs.get(ref)
        return (stored[1] if stored is not None and stored[0] == generation else 0), self.now()

    def set_epoch(self, ref: KeyRef, generation: str, epoch: int, lease: FakeLease) -> None:
        self._fenced(lease, f"epoch {ref.key_id} {epoch}")
        if not self._lose():
            self.epochs[ref] = (generation, epoch)

    def record(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        if entry.get("kind") == "rotation":
            self.last[KeyRef(entry["client_id"], entry["key_id"])] = entry

    def last_rotation(self, ref: KeyRef) -> dict[str, Any] | None:
        return self.last.get(ref)

    def mark_stored_rotation(self, ref: KeyRef, replaced: str, when: float) -> None:
        self.stored_slots[ref] = {"replaced": replaced, "time": when}

    def stored_rotation(self, ref: KeyRef) -> dict[str, Any] | None:
        return self.stored_slots.get(ref)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.entries[-limit:]

    def lineage_links(self, client_id: str) -> dict[str, dict[str, Any]]:
        self.sim.point(f"redis lineage {client_id}")
        return {key_id: dict(entry) for key_id, entry in self.links.get(client_id, {}).items()}

    def put_lineage_links(self, client_id: str, links: dict[str, dict[str, Any]], how: str = "merge") -> None:
        self.sim.point(f"redis link {sorted(links)}")
        if not self._lose():
            held = self.links.setdefault(client_id, {})
            for key_id, entry in links.items():
                if how == "merge" and key_id in held:
                    held[key_id] = {**held[key_id], **entry}
                elif how != "new" or key_id not in held:
                    held[key_id] = dict(entry)
            self.known.update(k for k, v in links.items() if v.get("replaces"))  # linked as a successor

    def drop_lineage_links(self, client_id: str, key_ids: list[str]) -> None:
        self.sim.point(f"redis unlink {key_ids}")
        held = self.links.get(client_id, {})
        for key_id in key_ids:
            held.pop(key_id, None)
        for entry in held.values():
            for name in ("replaces", "replaced_by"):
                if entry.get(name) in key_ids:
                    del entry[name]


# --- one run -------------------------------------------------------------------------------------
def key_of(sim: Sim, record: AttemptRecord) -> str:
    """The Idempotency-Key a record stands for, derived as every worker derives it."""
    return engine_for(sim, "invariants")._key_of(record)


class IntentRecorded(AliasSuccessors):
    """The alias-template mode as the engine runs it, telling the fake key service (the oracle)
    which key each create replaces: the published contract's create carries no such field."""

    def create_key(self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str,
                   replaces: str | None = None) -> IssuedKey:
        if replaces is not None:
            self.inner.intent[idempotency_key] = replaces  # type: ignore[attr-defined]
        return super().create_key(client_id, alias, scopes, idempotency_key, replaces)


def engine_for(sim: Sim, actor: str) -> Engine:
    policy = Policy(strategy="overlap", overlap_grace_s=GRACE_S) if sim.overlap else Policy()
    service: Any = sim.service
    if not sim.service.successors:
        service = IntentRecorded(sim.service, AliasTemplate(), sim.state, list(sim.sinks),  # type: ignore[arg-type]
                                 creates_of(FP.derive(b"idempotency-key")))
    return Engine(service, list(sim.sinks), sim.state, sim.events, FP, policy, sink_retry_s=5.0,
                  lock_ttl_s=TTL_S, clock=lambda: sim.now, actor=actor, clients=["sim"], horizon_s=HORIZON_S,
                  executor=INLINE, sleep=sim.sleep, monotonic=lambda: sim.now)


def run_seed(seed: int, *, durable: bool = False) -> Sim:
    """One schedule: keys, triggers and faults all drawn from `seed`; raises Violation on a broken
    invariant, carrying the run's event trace. `durable`: Redis loses nothing, so the mid-run
    invariant is checked in every run."""
    sim = Sim(seed)
    outside = random.getstate()
    random.seed(seed)  # the engine's back-off jitter draws from `random`: the same seed, the same run
    try:
        return _run(sim, durable)
    except Violation as exc:
        exc.trace = sim.trace  # type: ignore[attr-defined]
        raise
    finally:
        random.setstate(outside)


def _run(sim: Sim, durable: bool) -> Sim:
    seed = sim.seed
    rng = sim.rng
    keys = [f"k{i}" for i in range(rng.randint(1, 3))]
    sim.overlap = rng.random() < 0.5
    # Half the overlap runs against the contract as published (no successors: derived aliases),
    # drawn apart from the run's own stream so that every other draw of a seed stays as it was.
    sim.service.successors = not (sim.overlap and random.Random(seed * 7 + 1).random() < 0.5)
    for key_id in keys:
        sim.service.add(key_id, int(sim.now - 400 * DAY))
    sim.state.on_delete = lambda record: check_delete(sim, record)

    def trigger(n: int) -> None:
        key_id = rng.choice(keys)
        seen = str(sim.service.keys[key_id].generation)
        kind = rng.choice(["schedule", "schedule", "manual", "force", "recover", "repair"])
        engine = engine_for(sim, f"w{n}")
        ref = KeyRef("sim", key_id)
        if kind == "recover":
            work: Callable[[], Any] = engine.recover_all
        elif kind == "repair" and n % 2:  # beat's automatic repair: replays only, never a fresh reset
            work = lambda: engine.repair(fresh=False, recent_only=True)  # noqa: E731
        elif kind == "repair":
            work = engine.repair
        else:
            def work() -> Any:
                return engine.rotate(ref, trigger="manual" if kind == "force" else kind, force=kind == "force",
                                     generation=seen)
        sim.spawn(f"w{n}:{kind[:5]}:{key_id}", work)
        if rng.random() < 0.3:  # the broker delivers the same message twice
            sim.spawn(f"w{n}:again:{key_id}", work)

    for n in range(rng.randint(2, 6)):
        trigger(n)
    if rng.random() < 0.5:  # beat's recovery sweep runs while the chaos goes on (late commits still pending)
        sweep, pause = engine_for(sim, "sweep"), rng.uniform(5, 70)
        sim.spawn("sweep", lambda: (sim.sleep(pause), sweep.recover_all())[1])
    # Either Redis loses state (writes, or everything), or a day passes with no recovery (answers
    # expire), not both: with no record and no replay left, nothing can tell rotator's lost reset
    # from a stranger's. (Keep Redis persistent, or recovery running: docs/protocol.md.)
    world = rng.random()
    if world < 0.15 and not durable:
        sim.at(rng.uniform(0, 30), sim.state.restart_empty)
    elif world < 0.20 and not durable:
        sim.state.may_lose = False
        sim.at(rng.uniform(0, 30), lambda: setattr(sim, "now", sim.now + 25 * 3600))  # a day passes
    if durable or 0.20 <= world < 0.45:  # Redis keeps everything: every unstored live secret is covered mid-run
        sim.state.may_lose = False
        sim.durable = True
    if rng.random() < 0.15:  # Redis's clock jumps ahead (cuts the in-doubt horizon short)
        sim.at(rng.uniform(0, 30), lambda: setattr(sim.state, "clock_offset", rng.uniform(60, 600)))
    if sim.overlap and rng.random() < 0.3:  # a sink is down for a while after the creates: stored late
        down, start, length = rng.choice(sim.sinks), rng.uniform(1, 6), rng.uniform(25, 70)
        sim.at(start, lambda: setattr(down, "down_until", sim.now + length))
    if sim.overlap and sim.durable and rng.random() < 0.2:  # a person revokes an old key that has a successor
        victim = rng.choice(keys)
        sim.at(rng.uniform(3, 40), lambda: sim.service.revoke_by_person(victim)
               if sim.service.keys.get(victim) and sim.service.keys[victim].replaced_by else None)
    if sim.overlap and rng.random() < 0.5:  # the grace ends while the chaos goes on: late triggers retire
        sim.at(rng.uniform(0, 30), lambda: setattr(sim, "now", sim.now + GRACE_S + 1))
        for n in range(rng.randint(1, 3)):
            key_id, engine = rng.choice(keys), engine_for(sim, f"late{n}")
            waits = [rng.uniform(30, 100), rng.uniform(10, 60), rng.uniform(10, 60)]

            def late(k: str = key_id, pauses: list[float] = waits, e: Engine = engine) -> Any:
                for pause in pauses:  # a trigger that settles a late store, then ones that retire
                    sim.sleep(pause)
                    result = e.rotate(KeyRef("sim", k), trigger="schedule")
                return result

            sim.spawn(f"late{n}:{key_id}", late)
    sim.run()
    for worker in sim.workers:
        if worker.error is not None:
            raise Violation(f"seed {seed}: {worker.name} raised {type(worker.error).__name__}: {worker.error}")
    if sim.durable:
        covered_or_alarmed(sim)

    # Heal everything, let the horizon pass, and let recovery finish what is left.
    sim.chaos = False
    for fake in (sim.service, sim.state, *sim.sinks):
        fake.faulty = False
    sim.now += HORIZON_S + 2 * TTL_S + 61
    sim.run()
    for round_ in range(6):
        engine = engine_for(sim, f"heal{round_}")
        sim.spawn(f"heal{round_}", engine.repair)
        sim.run()
        sim.now += HORIZON_S + 1
        if not sim.state.records and not unstored(sim):
            break
    if sim.overlap:  # past every grace, each replaced key is revoked
        sim.now += GRACE_S + 1
        for round_ in range(3):
            engine = engine_for(sim, f"retire{round_}")
            for key_id in [k for k, key in sim.service.keys.items() if key.replaced_by is not None]:
                sim.spawn(f"retire{round_}:{key_id}", lambda k=key_id, e=engine: e.rotate(
                    KeyRef("sim", k), trigger="schedule"))
            sim.run()
    check(sim)
    return sim


def heads(sim: Sim) -> list[tuple[str, FakeKey]]:
    """The live keys consumers must read: every key no successor replaces, whose secret rotator
    issued (by a reset, or as a successor)."""
    created = {new for *_, new in sim.service.creates}
    return [(key_id, key) for key_id, key in sim.service.keys.items()
            if key.replaced_by is None and (key.last_reset_at is not None or key_id in created)
            and not sim.service.unproved(key_id)]


def covered_or_alarmed(sim: Sim) -> None:
    """Before any repair: a live secret that is not in every sink has its attempt record (naming
    the key that issued it: its own, or its predecessor's for a successor), or a critical event was
    raised for its key."""
    for key_id, key in heads(sim):
        if all(s.holds(key.base, key.secret) for s in sim.sinks):
            continue
        issuers = {ik for ik, (_, kid, status, answer) in sim.service.issued.items()
                   if kid == key_id and status == 200 and answer is not None and answer.secret.reveal() == key.secret}
        owners = {key_id} | {replaced for replaced, _, _, new in sim.service.creates if new == key_id}
        records = [r for r in sim.state.records.values() if r.key_id in owners]
        alarmed = any(e.name == "rotation.secret_at_risk" and e.key_id in owners for e in sim.events.events)
        if not any(key_of(sim, r) in issuers for r in records) and not alarmed:
            raise Violation(f"seed {sim.seed}: the live secret of {key_id} is not in every sink, and neither its "
                            "attempt record nor a critical event says so")


def unstored(sim: Sim) -> list[str]:
    """Keys whose live secret (issued by a reset or a create) consumers cannot read in every sink."""
    missing = []
    for key_id, key in heads(sim):
        missing.extend(f"{key_id} not in {s.name}" for s in sim.sinks if not s.holds(key.base, key.secret))
    return missing


def check_delete(sim: Sim, record: AttemptRecord) -> None:
    """No attempt record is deleted while the live secret its reset issued is in no sink."""
    found = sim.service.issued.get(key_of(sim, record))
    if found is None or found[2] != 200 or found[3] is None:
        return
    if sim.now - found[0] >= REPLAY_TTL_S and "rotation.secret_at_risk" in [
            e.name for e in sim.events.events if e.key_id == record.key_id]:
        return  # past the replay window the secret is gone for good: said loudly, then reset afresh
    key = sim.service.keys.get(found[1])  # the key the answer issued: this one, or its successor
    if key is None:
        return  # revoked since: its secret is dead
    issued = found[3].secret.reveal()
    if issued == key.secret and not all(s.holds(key.base, issued) for s in sim.sinks):
        raise Violation(f"seed {sim.seed}: record of {record.key_id} deleted while its live secret is unstored")


def check(sim: Sim) -> None:
    """The invariants, after the faults healed and recovery ran."""
    replaced: dict[tuple[str, Generation], str] = {}
    for key_id, generation, ik in sim.service.ledger:
        if (key_id, generation) in replaced:
            raise Violation(f"seed {sim.seed}: {key_id} generation {generation} was reset twice")
        replaced[(key_id, generation)] = ik
    if missing := unstored(sim):
        raise Violation(f"seed {sim.seed}: live secrets not stored after recovery: {missing}")
    if sim.state.records:
        raise Violation(f"seed {sim.seed}: records left after recovery: {sorted(map(str, sim.state.records))}")
    for worker in sim.workers:
        if worker.error is not None:
            raise Violation(f"seed {sim.seed}: {worker.name} raised {type(worker.error).__name__}: {worker.error}")
    if sim.overlap:
        created: dict[tuple[str, Generation], list[str]] = {}
        for replaced_key, generation, _, new in sim.service.creates:
            created.setdefault((replaced_key, generation), []).append(new)
        for (replaced_key, _), news in created.items():
            if [n for n in news[:-1] if n not in sim.service.revoked and not sim.service.unproved(n)]:
                raise Violation(f"seed {sim.seed}: {replaced_key} got two live successors: {news}")
        for alias, live in sim.service.lineages().items():
            if len(live) != 1:
                raise Violation(f"seed {sim.seed}: {alias} has {live} live after every grace: not retired")
    secrets = [k.secret for k in sim.service.keys.values()]
    texts = [repr(e.to_dict()) for e in sim.events.events] + [repr(e) for e in sim.state.entries]
    for w in sim.workers:
        texts.append(repr(w.result))
    blob = "\n".join(texts)
    if any(s in blob for s in secrets):
        raise Violation(f"seed {sim.seed}: a secret reached an event, a result or the history")
    # An Idempotency-Key reads the live secret from the stored answer for a day: as secret.
    blob += "\n".join(sim.state.written)
    if leaked := [ik for ik in sim.service.keys_seen if ik in blob]:
        raise Violation(f"seed {sim.seed}: {len(leaked)} Idempotency-Keys reached an event, a result, the history "
                        "or an attempt record")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10_000, help="how many seeds, from --start")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, help="run one seed")
    parser.add_argument("--trace", action="store_true", help="print the event trace")
    args = parser.parse_args(argv)
    from rotator import logs

    logs.configure("CRITICAL")
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    started = time.monotonic()
    resets = 0
    for seed in seeds:
        try:
            sim = run_seed(seed)
        except Violation as exc:
            print(f"VIOLATION {exc}", file=sys.stderr)
            print(f"replay with: python -m tests.sim --seed {seed} --trace", file=sys.stderr)
            return 1
        resets += len(sim.service.ledger)
        if args.trace:
            print("\n".join(sim.trace))
    print(f"{len(seeds)} seeds, {resets} resets, no violation, {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
