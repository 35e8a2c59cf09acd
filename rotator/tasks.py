"""Thin Celery tasks over the engine. Arguments and results never hold a secret."""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from celery import Celery, signals

from rotator import logs
from rotator.config import load_settings
from rotator.domain import KeyRef, KeyState
from rotator.engine import LOCKED, Engine
from rotator.policy import classify
from rotator.scan import scan as scan_keys

app = Celery("rotator")
app.config_from_object("rotator.celeryconf")
log = logs.get("rotator.tasks")


@cache
def engine() -> Engine:
    """One engine per worker process, built after the fork."""
    from rotator.runtime import build_engine

    return build_engine(load_settings(), actor="celery")


@app.task(name="rotator.rotate_key", bind=True, acks_late=True, max_retries=0)
def rotate_key(self: Any, client_id: str, key_id: str, trigger: str = "manual",
               triggered_at: float | None = None, force: bool = False) -> dict[str, Any]:
    result = engine().rotate(KeyRef(client_id, key_id), trigger=trigger, force=force, triggered_at=triggered_at)
    log.info("rotation.result", **{k: v for k, v in result.to_dict().items() if k != "sinks"})
    return result.to_dict()


@app.task(name="rotator.scan")
def scan() -> dict[str, Any]:
    """On the beat: fan out one rotate_key per due key. Runs once per interval however many beats fire."""
    settings = load_settings()
    eng = engine()
    now = time.time()
    slot = int(now // settings.celery.scan_every_s)
    if not eng.state.once(f"scan:{slot}", settings.celery.scan_every_s):
        return {"skipped": "another beat already scanned in this interval"}
    window = settings.policy.rotation_window()
    enforce = settings.policy.mode == "enforce"
    counts: dict[str, int] = {}
    queued = 0
    for row in scan_keys(eng.keyservice, eng.policy, now, settings.keyservice.clients):
        counts[row.state.value] = counts.get(row.state.value, 0) + 1
        if row.state is not KeyState.DUE:
            continue
        from datetime import UTC, datetime

        if enforce and (window is None or window.contains(datetime.fromtimestamp(now, UTC))):
            rotate_key.delay(row.key.client_id, row.key.key_id, "schedule", now)
            queued += 1
        else:
            eng.emit("key.overdue", row.key, error="audit mode" if not enforce else "outside the rotation window")
    eng.state.client.set(f"{eng.state.ns}:last_scan", now)  # type: ignore[attr-defined]
    return {"queued": queued, "counts": counts, "mode": settings.policy.mode}


@app.task(name="rotator.recover", bind=True, max_retries=20)
def recover(self: Any) -> list[dict[str, Any]]:
    """Finish left-over attempts. One still leased (say, by a worker killed a moment ago) is
    tried again once that lease can have expired."""
    eng = engine()
    results = eng.recover_all()
    if any(r.reason == LOCKED for r in results):
        raise self.retry(countdown=max(1.0, eng.lock_ttl_s / 3))
    return [r.to_dict() for r in results]


@app.task(name="rotator.reconcile")
def reconcile() -> list[dict[str, str]]:
    return [{"client_id": d.key.client_id, "key_id": d.key.key_id, "sink": d.sink, "reason": d.reason}
            for d in engine().drift()]


@app.task(name="rotator.warn_due_soon")
def warn_due_soon() -> dict[str, int]:
    eng = engine()
    now = time.time()
    sent = 0
    for cid in eng._clients or [c.client_id for c in eng.keyservice.list_clients()]:
        for key in eng.keyservice.list_keys(cid):
            if classify(key, now, eng.policy) is KeyState.DUE_SOON:
                eng.emit("key.due_soon", key)
                sent += 1
    return {"due_soon": sent}


@signals.worker_ready.connect
def _recover_at_start(**_: Any) -> None:
    """A worker that starts finishes what a crashed one left: recovery runs before new work."""
    recover.delay()


@signals.worker_process_init.connect
def _logging_in_child(**_: Any) -> None:
    logs.configure()
