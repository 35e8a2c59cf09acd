"""Thin Celery tasks over the engine. Arguments and results never hold a secret."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

from celery import Celery, signals
from celery.exceptions import Ignore, Reject, Retry

from rotator import gate, logs
from rotator.alerts.dispatch import DirectPublisher, already_sent, event_from_dict, mark_sent, routes
from rotator.alerts.outbox import Deliverer, Outbox
from rotator.config import process_settings
from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.errors import BudgetSpent, RotatorError, TransientError
from rotator.events import LogPublisher
from rotator.gate import actor_of
from rotator.heartbeat import Heartbeat
from rotator.places import due_with_places
from rotator.protocols import Event
from rotator.scan import ScanRow
from rotator.scan import scan as scan_keys

T = TypeVar("T")


class TaskFailed(RotatorError):
    """What a failed task is stored and logged as: the error's class and, for rotator's own errors
    (built without secrets), their message; never the text of any other exception, which may carry
    a value a peer sent (a secret included)."""


def contained(task: Callable[..., T]) -> Callable[..., T]:
    """The one boundary between task code and Celery's result backend and logs."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except BudgetSpent as exc:  # not a failure: the next run takes what is left
            log.warning("task.deferred", task=task.__name__, client_id=exc.client_id, until=exc.until, why=exc.why)
            return {"deferred_until": exc.until, "reason": str(exc)}  # type: ignore[return-value]
        except RotatorError as exc:
            failure = TaskFailed(f"{type(exc).__name__}: {str(exc)[:500]}")
        except Exception as exc:
            failure = TaskFailed(f"{type(exc).__name__} (its message is withheld: it may carry a secret)")
        raise failure  # outside the handler: no chained original in the stored traceback

    return run


# Every publish is signed (rotator.gate.SignedAMQP) and every delivery passes the gate (GatedTask).
app = Celery("rotator", task_cls="rotator.gate:GatedTask", amqp="rotator.gate:SignedAMQP")
app.config_from_object("rotator.celeryconf")
app.steps["consumer"].add(Heartbeat)
log = logs.get("rotator.tasks")
# Publishing an alert must never hold up a rotation: a broker hiccup gets two quick tries.
_QUICK = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


settings = process_settings  # this worker's configuration, read once


class CeleryPublisher:
    """Logs every event and hands each channel's copy to the `notify` task; a critical one goes to
    the worker's own outbox instead, delivered without the broker (rotator.alerts.outbox)."""

    def __init__(self) -> None:
        self._log = LogPublisher()
        self._routes = routes(settings())

    def publish(self, event: Event) -> None:
        self._log.publish(event)
        for route in self._routes:
            if not route.wants(event):
                continue
            box = outbox() if event.severity == "critical" and _in_worker else None
            if box is not None:
                try:
                    box.add(route.index, event)
                    continue
                except OSError as exc:  # a full or read-only disk: the broker is the way left
                    log.error("alert.outbox_failed", event_name=event.name, error_type=type(exc).__name__)
            try:
                notify.apply_async((route.index, event.to_dict()), retry=True, retry_policy=_QUICK)
            except Exception as exc:
                if event.severity != "critical":
                    raise
                # No broker and no outbox here (a CLI run): this process delivers it itself, once.
                log.error("alert.broker_unreachable", event_name=event.name, error_type=type(exc).__name__)
                from rotator.runtime import build_state

                DirectPublisher(settings(), build_state(settings(), timeout_s=2.0), [route]).publish(event)


_in_worker = False  # a worker's process (its children included); a CLI process sends through the broker


@cache
def outbox() -> Outbox | None:
    """This worker's outbox of critical alerts (`celery.alert_outbox_dir`, else its private state
    directory); None when it has none (they then go through the broker, as every other alert does)."""
    from rotator.safety import private_dir_problem, private_state_dir

    try:
        directory = settings().celery.alert_outbox_dir
        if directory is None:
            directory = private_state_dir()
        else:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            problem = private_dir_problem(directory)
            if problem is not None:
                raise PermissionError(f"alert outbox directory {directory} {problem}")
        return Outbox(directory / f"alert-outbox-{settings().state.namespace}.jsonl")
    except OSError as exc:
        log.warning("alert.no_outbox", error=str(exc))
        return None


def _start_delivering() -> None:
    global _in_worker
    _in_worker = True
    box = outbox()
    if box is not None and settings().alerts:
        Deliverer(box, routes(settings()), lambda: engine().state).start()


gate.alert_through(CeleryPublisher)  # the gate's forged-message alert goes out like every other event


@cache
def engine() -> Engine:
    """One engine per worker process, built after the fork."""
    from rotator.runtime import build_engine

    return build_engine(settings(), publisher=CeleryPublisher(), actor="celery")


@app.task(name="rotator.rotate_key", bind=True, acks_late=True, max_retries=30)
@contained
def rotate_key(self: Any, client_id: str, key_id: str, trigger: str = "manual", generation: Any = None,
               force: bool = False, reason: str = "", actor: str = "",
               include_out_of_scope: bool = False, strategy: str | None = None) -> dict[str, Any]:
    """`generation` is the key's generation the trigger saw: a redelivered or duplicate message for
    a key rotated since is skipped. The audit trail's actor is the verified signer (or the origin a
    relay vouches for), never `actor`, which only a direct call and an older worker read. A key
    outside the policy's scope is refused unless `include_out_of_scope` (the CLI's explicit flag)
    travels with the message. A key behind another actor's lease (a live duplicate, or a worker
    that died a moment ago) is tried again once that lease can have ended, never dropped.
    `strategy` (`reset`/`overlap`) overrides the policy's for this message."""
    eng = engine()
    verified = actor_of(self.request)
    seen = generation if isinstance(generation, str) else None  # a message of the first protocol had a time
    result = eng.rotate(KeyRef(client_id, key_id), trigger=trigger, force=force, generation=seen,
                        reason=reason, actor=verified or actor or None, include_out_of_scope=include_out_of_scope,
                        strategy=strategy if strategy in ("reset", "overlap") else None)
    if result.status == "busy":
        raise self.retry(countdown=max(1.0, eng.ctx.lock_ttl_s / 3))
    return result.to_dict()


@app.task(name="rotator.scan")
@contained
def scan() -> dict[str, Any]:
    """On the beat: one rotate_key per due key; claimed once per interval however many beats fire."""
    s = settings()
    eng = engine()
    now = time.time()
    slot = int(now // s.celery.scan_every_s)
    if not eng.state.once(f"scan:{slot}", s.celery.scan_every_s):
        return {"skipped": "another beat already scanned in this interval"}
    window = s.policy.rotation_window()
    inside = window is None or window.contains(datetime.fromtimestamp(now, UTC))
    enforce = s.policy.mode == "enforce"
    counts: dict[str, int] = {}
    queued = 0

    def counted(rows: Iterator[ScanRow]) -> Iterator[ScanRow]:
        for row in rows:
            counts[row.state.value] = counts.get(row.state.value, 0) + 1
            yield row

    # Keys that would share a sink place are found across the whole scan, before anything is queued.
    held: list[BudgetSpent] = []  # a Client ID whose rate budget is spent waits; the others go on
    rows = counted(scan_keys(eng.keyservice, eng.policy, now, s.keyservice.clients, held))
    for key, conflict in due_with_places(rows, eng.sinks, eng.retire_at if enforce else None, now):
        if conflict is not None:  # never reset a key whose secret would take another key's place
            eng.emit("rotation.failed", key, error=f"not rotated: {conflict}")
        elif enforce and inside:
            rotate_key.delay(key.client_id, key.key_id, "schedule", str(key.generation))
            queued += 1
        else:  # reported, not rotated; alert channels de-duplicate it to one a day
            eng.emit("key.overdue", key, error="audit mode" if not enforce else "outside the rotation window")
    eng.state.mark_scan(now)  # type: ignore[attr-defined]
    deferred = {spent.client_id: spent.until for spent in held}
    log.info("scan.finished", queued=queued, mode=s.policy.mode, inside_window=inside, deferred=deferred, **counts)
    return {"queued": queued, "counts": counts, "mode": s.policy.mode, "inside_window": inside,
            **({"deferred_until": deferred} if deferred else {})}


@app.task(name="rotator.recover", bind=True, max_retries=20)
@contained
def recover(self: Any) -> list[dict[str, Any]]:
    """Settle left-over attempts. One still leased (by a worker killed a moment ago, say) is tried
    again once that lease can have expired; one still in doubt, once its horizon can have passed."""
    eng = engine()
    results = eng.recover_all()
    if any(r.status == "busy" for r in results):
        raise self.retry(countdown=max(1.0, eng.ctx.lock_ttl_s / 3))
    if any(r.status == "in_doubt" for r in results):
        raise self.retry(countdown=max(1.0, eng.ctx.horizon_s / 2))
    return [r.to_dict() for r in results]


@app.task(name="rotator.reconcile")
@contained
def reconcile() -> dict[str, Any]:
    """On the beat (`celery.reconcile_every_s`, daily): every key against every sink. In `enforce`
    mode it repairs what a replay can repair and tells the rest; in `audit` mode it only tells."""
    every = settings().celery.reconcile_every_s
    if not engine().state.once(f"reconcile:{int(time.time() // every)}", every):
        return {"skipped": "another beat already ordered this interval's reconcile"}
    if settings().policy.mode != "enforce":
        return {"drift": _drift_rows(engine().drift()), "repaired": []}
    return _repaired(*engine().repair(fresh=False))


@app.task(name="rotator.repair")
@contained
def repair() -> dict[str, Any]:
    """On the beat (`celery.repair_every_s`, enforce mode): attempt records, and the sinks of keys
    reset within the replay lookback; a secret a sink or a wiped Redis lost is replayed and stored,
    never reset afresh. Claimed once per interval however many beats fire."""
    s = settings()
    eng = engine()
    every = s.celery.repair_every_s
    if s.policy.mode != "enforce" or not every:
        return {"skipped": "automatic repair is off (audit mode, or celery.repair_every_s = 0)"}
    if not eng.state.once(f"repair:{int(time.time() // every)}", every):
        return {"skipped": "another beat already ordered this interval's repair"}
    return _repaired(*eng.repair(fresh=False, recent_only=True))


def _drift_rows(drifted: list[Any]) -> list[dict[str, str]]:
    return [{"client_id": d.key.client_id, "key_id": d.key.key_id, "sink": d.sink, "reason": d.reason}
            for d in drifted]


def _repaired(drifted: list[Any], results: list[Any]) -> dict[str, Any]:
    rows = [r.to_dict() for r in results]
    log.info("repair.finished", drift=len(drifted), settled=len(rows),
             unrepaired=sum(1 for r in rows if not r["ok"]))
    return {"drift": _drift_rows(drifted), "repaired": rows}


@app.task(name="rotator.publish_view")
@contained
def publish_view() -> dict[str, Any]:
    """On the beat (`view.publish_every_s`): the fleet view `rotator web` and `rotator metrics` read
    with a read-only Redis user (rotator.view), so they need no credential of their own."""
    s = settings()
    eng = engine()
    if not eng.state.once(f"view:{int(time.time() // s.view.publish_every_s)}", s.view.publish_every_s):
        return {"skipped": "another beat already published in this interval"}
    from rotator import view
    from rotator.runtime import build_state

    state = build_state(s)
    ttl_s = max(3 * s.view.publish_every_s, 600)
    lease = state.acquire("view-publish", ttl_s)  # a publication slower than the interval: never two at once
    if lease is None:
        state.client.close()
        return {"skipped": "a publication is still running"}
    try:
        with lease.kept_alive():
            return view.publish(eng, state, s.policy.overlap_grace_s, s.keyservice.delete_after_s, ttl_s=ttl_s)
    finally:
        lease.release()
        state.client.close()


@app.task(name="rotator.warn_due_soon")
@contained
def warn_due_soon() -> dict[str, int]:
    """Daily: `key.due_soon` inside the warning period, `key.overdue` for keys past due."""
    every = settings().celery.warn_every_s
    if not engine().state.once(f"warn:{int(time.time() // every)}", every):
        return {"skipped": 1}
    return engine().warn(time.time())


@app.task(name="rotator.notify", bind=True, max_retries=10, acks_late=True)
@contained
def notify(self: Any, route_index: int, event: dict[str, Any]) -> str:
    """Deliver one event to one channel; retried with back-off while the receiver is down."""
    route = routes(settings())[route_index]
    ev = event_from_dict(event)
    # The de-duplication slot is claimed only after a successful send: a worker killed between the
    # two sends the event again (a duplicate), never drops it.
    if already_sent(route, ev, engine().state):
        return "duplicate"
    try:
        route.notifier().send(ev)
        mark_sent(route, ev, engine().state)
    except TransientError as exc:
        log.warning("alert.retrying", channel=route_index, event_name=ev.name, error=str(exc),
                    retries=self.request.retries)
        raise self.retry(countdown=min(300, 2 ** self.request.retries)) from None
    except RotatorError as exc:
        log.error("alert.failed", channel=route_index, event_name=ev.name, error=str(exc))
        return "failed"
    return "sent"


@signals.worker_ready.connect
def _recover_at_start(**_: Any) -> None:
    """A worker that starts finishes what a crashed one left: recovery runs before new work."""
    recover.delay()


@signals.worker_process_init.connect
def _logging_in_child(**_: Any) -> None:
    logs.configure()
    _start_delivering()  # after the fork: no thread of this kind is ever forked


@signals.worker_init.connect
def _deliver_without_children(sender: Any = None, **_: Any) -> None:
    """The worker's own process writes its critical alerts (the gate's) to the outbox too; the solo
    and thread pools fork no child to deliver it, so there this process does."""
    global _in_worker
    _in_worker = True
    pool = str(getattr(sender, "pool_cls", "") or "")
    if pool and "prefork" not in pool:
        _start_delivering()


@signals.worker_init.connect
@signals.beat_init.connect
def _no_core_files(**_: Any) -> None:
    """However the worker or beat is started (`rotator worker`, or `celery -A rotator.tasks worker`):
    no core file of a process that holds secrets."""
    from rotator.safety import no_core_dumps

    missed = no_core_dumps()
    if missed:
        log.warning("core_dumps.not_off", missed=missed)
