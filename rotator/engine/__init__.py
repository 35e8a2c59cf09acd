"""One rotation per key generation, over the attempt protocol (`rotator.protocol`).

`Engine` is the facade: scheduled, manual and recovery paths all call `rotate`, `recover_all` or
`repair` here, and each step of the protocol runs in the module for its concern, in this order
(each imports only the ones above it):

- `values`, `context`: the results and the shared state every step receives;
- `report`: results, history, events; `sinkio`: the sinks, all at once; `lineage`: a key's successor;
- `records`: the attempt record's Idempotency-Key and its own transitions;
- `store`: write, read back, verify, then clear; `overlap`: retire, or settle a lost create;
- `attempt`: start an attempt, classify its answer, settle an earlier one;
- `flow`: a rotation under the key's lease; `reconcile`: drift, orphans, repair without Redis.

No Celery, HTTP or Redis here: only protocols. docs/protocol.md ("Reading the code") walks a rotation
through them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from rotator.aliases import AliasTemplate
from rotator.domain import ApiKey, AttemptRecord, KeyRef
from rotator.engine import attempt, flow, lineage, reconcile, records, report, store
from rotator.engine.context import Context
from rotator.engine.successors import AliasSuccessors, creates_of
from rotator.engine.values import (
    INLINE,
    LOCKED,
    OK_STATUSES,
    Drift,
    Orphan,
    RotationResult,
    SinkReads,
    freshness,
    grace_start,
)
from rotator.errors import PermanentError
from rotator.fingerprint import Fingerprinter
from rotator.policy import Policy, RotationWindow
from rotator.protocol import DEFAULT_HORIZON_S, TRANSITIONS, Phase, Step, derivation_id
from rotator.protocols import EventPublisher, KeyService, SecretSink, StateStore

__all__ = ["CLOCK_ROOM_S", "INLINE", "IN_USE_WINDOW_S", "LOCKED", "OK_STATUSES", "PERFORMED_BY", "REPLAY_LOOKBACK_S",
           "STORED_SUCCESSOR", "STUCK_S", "Drift", "Engine", "Orphan", "RotationResult",
           "SinkReads", "freshness", "grace_start", "steps_table"]

P, S = Phase, Step
#: The one function that performs each transition of `protocol.TRANSITIONS` (its durable write, or
#: the call that leads to it); docs/protocol.md links every row of the table to it.
PERFORMED_BY: dict[tuple[Phase, Step], Callable[..., object]] = {
    (P.IDLE, S.START): attempt.reset,
    (P.RESETTING, S.ANSWERED): attempt.send,
    (P.RESETTING, S.REFUSED): records.refused,
    (P.RESETTING, S.NO_ANSWER): records.to_doubt,
    (P.IN_DOUBT, S.ANSWERED): attempt.settle,
    (P.IN_DOUBT, S.REFUSED): records.refused,
    (P.IN_DOUBT, S.NO_ANSWER): attempt.settle,
    (P.IN_DOUBT, S.NOT_RUN): attempt.send_again,
    (P.IN_DOUBT, S.SPENT): attempt.send_again,
    (P.IN_DOUBT, S.LOST): attempt.lost,
    (P.RESETTING, S.STILL_LOST): records.still_lost,
    (P.IN_DOUBT, S.STILL_LOST): records.still_lost,
    (P.RESETTING, S.DEFERRED): attempt.held_back,
    (P.RESETTING, S.HELD): attempt.held_back,
    (P.STORING, S.STORED): store.stored,
    (P.STORING, S.NOT_STORED): store.not_stored,
    (P.STORING, S.ANSWERED): attempt.settle,
    (P.STORING, S.NO_ANSWER): attempt.settle,
    (P.STORING, S.LOST): attempt.lost,
}


def steps_table() -> str:
    """Every transition with the function that performs it, linked to its module (Markdown)."""
    rows = ["| phase | step | next | performed by |", "| --- | --- | --- | --- |"]
    for (phase, step), transition in TRANSITIONS.items():
        function = PERFORMED_BY[(phase, step)]
        module = function.__module__.rsplit(".", 1)[-1]
        link = f"[`{module}.{function.__name__}`](../rotator/engine/{module}.py)"
        rows.append(f"| {phase.value} | {step.value} | {transition.to.value} | {link} |")
    return "\n".join(rows)


class Engine:
    """The rotation core's entry points; every step runs in its own module over `self.ctx`."""

    def __init__(
        self, keyservice: KeyService, sinks: list[SecretSink], state: StateStore, publisher: EventPublisher,
        fingerprint: Fingerprinter, policy: Policy, *, sink_retry_s: float = 300.0, verify: bool = True,
        lock_ttl_s: float = 60.0, clock: Callable[[], float] = time.time, actor: str = "",
        clients: list[str] | None = None, horizon_s: float = DEFAULT_HORIZON_S,
        window: RotationWindow | None = None, executor: Executor | None = None,
        sleep: Callable[[float], None] = time.sleep, monotonic: Callable[[], float] = time.monotonic,
        idempotency_secret: bytes | None = None,
        reload: Callable[[dict[str, Any]], dict[str, str]] | None = None,
    ) -> None:
        if not sinks:
            raise PermanentError("at least one sink is needed")
        # Every process that builds an engine holds the same `idempotency_secret` (engine.idempotency_key_*);
        # without one, the keys come from the fingerprint key, as before there was a setting.
        mac = idempotency_secret or fingerprint.derive(b"idempotency-key")
        template = getattr(keyservice, "alias_template", None)
        if isinstance(template, AliasTemplate) and not isinstance(keyservice, AliasSuccessors):
            keyservice = AliasSuccessors(keyservice, template, state, sinks, creates_of(mac))  # derived aliases
        self.ctx = Context(
            keyservice=keyservice, sinks=sinks, state=state, publisher=publisher, fingerprint=fingerprint,
            policy=policy, sink_retry_s=sink_retry_s, verify=verify, lock_ttl_s=lock_ttl_s, clock=clock, actor=actor,
            clients=clients, horizon_s=horizon_s, window=window, sleep=sleep, monotonic=monotonic, ik_mac=mac,
            ik_id=derivation_id(mac), call=threading.local(), reload=reload,
            pool=executor or ThreadPoolExecutor(max_workers=len(sinks) + 1, thread_name_prefix="sink"))

    def __getattr__(self, name: str) -> Any:
        """The rest of the set-up, read-only, as the engine's attributes were (`lock_ttl_s`, `actor`, …)."""
        if name == "ctx" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.ctx, name)

    # What callers read of the engine's set-up (plans, the fleet view, tests).
    @property
    def keyservice(self) -> KeyService:
        return self.ctx.keyservice

    @property
    def sinks(self) -> list[SecretSink]:
        return self.ctx.sinks

    @property
    def state(self) -> StateStore:
        return self.ctx.state

    @property
    def publisher(self) -> EventPublisher:
        return self.ctx.publisher

    @property
    def policy(self) -> Policy:
        return self.ctx.policy

    @property
    def clients(self) -> list[str] | None:
        return self.ctx.clients

    def clock(self) -> float:
        return self.ctx.clock()

    def rotate(self, ref: KeyRef, *, trigger: str, force: bool = False, generation: str | None = None,
               reason: str = "", actor: str | None = None, include_out_of_scope: bool = False,
               strategy: str | None = None) -> RotationResult:
        """Rotate one key once, however many triggers fire for it (`flow.rotate`)."""
        return flow.rotate(self.ctx, ref, trigger=trigger, force=force, generation=generation, reason=reason,
                           actor=actor, include_out_of_scope=include_out_of_scope, strategy=strategy)

    def record_refusal(self, ref: KeyRef, reason: str, note: str = "", actor: str | None = None) -> RotationResult:
        """A rotation a plan refused, into the audit history (nothing is sent)."""
        return report.record_refusal(self.ctx, ref, reason, note, actor)

    def recover_all(self) -> list[RotationResult]:
        """Settle every attempt a crash, an outage or a lost answer left behind."""
        return flow.recover_all(self.ctx)

    def repair(self, fresh: bool = True, recent_only: bool = False) -> tuple[list[Drift], list[RotationResult]]:
        """`reconcile --repair`, or beat's automatic repair (`fresh=False`: never a new reset)
        (`reconcile.repair`)."""
        return reconcile.repair(self.ctx, fresh, recent_only)

    def drift(self, alert: bool = True, keys: Iterable[ApiKey] | None = None,
              reads: SinkReads | None = None) -> list[Drift]:
        """Sinks that do not hold the key's current secret (`reconcile.drift`)."""
        return reconcile.drift(self.ctx, alert, keys, reads)

    def orphans(self) -> tuple[list[Orphan], list[tuple[str, str]]]:
        """Sink entries of keys the key service no longer lists, and sinks that could not be listed."""
        return reconcile.orphans(self.ctx)

    def warn(self, now: float) -> dict[str, int]:
        """`key.due_soon` and `key.overdue` events (`report.warn`)."""
        return report.warn(self.ctx, now)

    def successor(self, key: ApiKey) -> ApiKey | None:
        return lineage.successor(self.ctx, key)

    def stored_at(self, successor: ApiKey) -> float:
        return lineage.stored_at(self.ctx, successor)

    def retire_at(self, key: ApiKey, successor: ApiKey) -> float:
        return lineage.retire_at(self.ctx, key, successor)

    def emit(self, name: str, key: ApiKey, attempt: AttemptRecord | None = None, error: str | None = None,
             details: dict[str, object] | None = None) -> None:
        report.emit(self.ctx, name, key, attempt, error, details)

    def _key_of(self, record: AttemptRecord) -> str:
        """The record's Idempotency-Key (tests compare it with what the key service saw)."""
        return records.key_of(self.ctx, record)

    @property
    def _ik_mac(self) -> bytes:
        return self.ctx.ik_mac

    @property
    def _ik_id(self) -> str:
        return self.ctx.ik_id

    def close(self) -> None:
        if isinstance(self.ctx.pool, ThreadPoolExecutor):
            self.ctx.pool.shutdown(wait=False)
