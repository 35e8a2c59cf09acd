"""Critical alerts without the broker: a durable local outbox the worker delivers from itself.

A critical event (`rotation.secret_at_risk`, `drift.detected`, ...) matters most when things go
wrong, which is when the broker may be gone. The worker process that detects one appends it, one
line per channel, to an append-only JSON Lines file in its private state directory (fsynced, under
an exclusive `flock`), and a delivery thread of the worker sends it to the channel itself (Apprise
or the signed webhook), retried with back-off until the channel takes it, then appends a `done`
line. One thread per state directory delivers at a time (a second `flock`); a worker restarted
after a crash delivers what was left pending. The file is emptied once nothing is pending.

An entry's `id` is derived from the channel and the event (its time included), so a retry, or a
delivery repeated after a crash between the send and the `done` line, carries the same event and
the same webhook id (`webhook-id` is derived from the body): receivers drop the duplicate. Redis's
de-duplication (`dedupe_window_s`) is applied when Redis answers and skipped when it does not: an
alert twice is better than never. Events never hold a secret (`rotator.events.sanitize`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rotator import logs
from rotator.alerts.dispatch import Route, already_sent, event_from_dict, mark_sent
from rotator.errors import RotatorError, TransientError
from rotator.protocols import Event, StateStore

log = logs.get("rotator.alerts")
MAX_BACKOFF_S = 300.0
POLL_S = 0.5  # how soon a line another process appended is picked up


@dataclass(frozen=True)
class Pending:
    id: str
    route: int
    event: dict[str, Any]


def entry_id(route: int, event: Event) -> str:
    body = json.dumps({"route": route, "event": event.to_dict()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class Outbox:
    """The append-only file (`path`) and its delivery lock (`path` + `.lock`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[IO[str]]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _append(self, entries: list[dict[str, Any]]) -> None:
        with self._locked() as handle:
            size = os.fstat(handle.fileno()).st_size
            if size and os.pread(handle.fileno(), 1, size - 1) != b"\n":
                handle.write("\n")  # after a line torn by a crash: ours starts on a line of its own
            handle.write("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries))
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, route: int, event: Event) -> str:
        """Durably queue `event` for channel `route`; returns its id."""
        ident = entry_id(route, event)
        self._append([{"id": ident, "route": route, "event": event.to_dict(), "added": time.time()}])
        return ident

    def done(self, ident: str, outcome: str) -> None:
        """`outcome`: sent, duplicate (Redis says the channel had it) or failed (refused for good)."""
        self._append([{"done": ident, "outcome": outcome, "at": time.time()}])

    def pending(self) -> list[Pending]:
        """Entries without a `done` line, in the order they were added. A torn last line (a crash
        mid-write) is skipped; it was never acknowledged to anyone."""
        if not self.path.exists():
            return []
        with self._locked() as handle:
            return [Pending(str(e["id"]), int(e["route"]), e["event"]) for e, _ in _unfinished(handle)]

    def compact(self, rewrite_at_bytes: int = 256 * 1024) -> None:
        """Empty the file once nothing in it is pending; past `rewrite_at_bytes`, rewrite it in place
        with the pending entries only (a channel down for long keeps some pending while others go)."""
        if not self.path.exists():
            return
        with self._locked() as handle:
            pending = [line if line.endswith("\n") else line + "\n" for _, line in _unfinished(handle)]
            if pending and os.fstat(handle.fileno()).st_size < rewrite_at_bytes:
                return
            handle.truncate(0)  # appenders write at the end (O_APPEND) and wait for this lock
            handle.write("".join(pending))
            handle.flush()
            os.fsync(handle.fileno())


def _unfinished(handle: IO[str]) -> list[tuple[dict[str, Any], str]]:
    """The entries of the file without a `done` line (each once, as first added), with their line."""
    handle.seek(0)
    added: dict[str, tuple[dict[str, Any], str]] = {}
    finished: set[str] = set()
    for line in handle:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "done" in entry:
            finished.add(str(entry["done"]))
        elif "id" in entry:
            added.setdefault(str(entry["id"]), (entry, line))
    return [found for ident, found in added.items() if ident not in finished]


class Deliverer:
    """Sends what the outbox holds, one thread per state directory at a time."""

    def __init__(self, outbox: Outbox, routes: list[Route], state: Callable[[], StateStore | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.routes = {route.index: route for route in routes}
        self.state = state
        self.clock = clock
        self.retry_at: dict[str, float] = {}
        self.tries: dict[str, int] = {}
        self.stopping = threading.Event()
        self._lock_handle: IO[str] | None = None

    def holds_the_lock(self) -> bool:
        """Whether this deliverer may deliver (another thread or process of this state directory may)."""
        if self._lock_handle is None:
            fd = os.open(self.outbox.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            handle = os.fdopen(fd, "r+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self._lock_handle = handle
        return True

    def deliver_due(self) -> int:
        """One pass: every pending entry whose channel is not backing off; returns how many were
        settled. A channel that fails is backed off as a whole (one try per back-off, not one per
        entry), and channels that answer go first, so one slow or dead channel never holds back
        another's alerts. An entry whose event is already pending before it (the same de-duplication
        key) is settled as a duplicate without a send."""
        settled = 0
        pending = self.outbox.pending()
        now = self.clock()
        failing: set[str] = set()
        seen: set[str] = set()
        for entry in sorted(pending, key=lambda e: self.tries.get(str(e.route), 0)):
            channel = str(entry.route)
            duplicate = self._dedupe_key(entry)  # settled even while its channel backs off: the file stays small
            if duplicate is not None and duplicate in seen:
                self.outbox.done(entry.id, "duplicate")
                settled += 1
                continue
            if duplicate is not None:
                seen.add(duplicate)
            if channel in failing or self.retry_at.get(channel, 0.0) > now:
                continue
            outcome = self._deliver(entry)
            if outcome is None:
                tries = self.tries[channel] = self.tries.get(channel, 0) + 1
                self.retry_at[channel] = self.clock() + min(MAX_BACKOFF_S, 2.0 ** tries)
                failing.add(channel)
                continue
            self.outbox.done(entry.id, outcome)
            self.retry_at.pop(channel, None)
            self.tries.pop(channel, None)
            settled += 1
        if settled:
            self.outbox.compact()
        return settled

    def _dedupe_key(self, entry: Pending) -> str | None:
        route = self.routes.get(entry.route)
        if route is None or route.config.dedupe_window_s == 0:
            return None
        return route.dedupe_key(event_from_dict(entry.event))

    def _deliver(self, entry: Pending) -> str | None:
        route = self.routes.get(entry.route)
        event = event_from_dict(entry.event)
        if route is None:  # the channel was removed from the configuration since
            log.error("alert.failed", channel=entry.route, event_name=event.name, error="no such channel any more")
            return "failed"
        state = self._state()
        try:
            if state is not None and already_sent(route, event, state):
                return "duplicate"
        except Exception:
            state = None  # Redis went away: deliver (twice is better than never)
        try:
            route.notifier().send(event)
        except TransientError as exc:
            log.warning("alert.retrying", channel=route.index, event_name=event.name, error=str(exc),
                        retries=self.tries.get(str(entry.route), 0), path="outbox")
            return None
        except RotatorError as exc:
            log.error("alert.failed", channel=route.index, event_name=event.name, error=str(exc))
            return "failed"
        if state is not None:
            try:
                mark_sent(route, event, state)
            except Exception as exc:  # delivered all the same; at worst a later copy is not dropped
                log.warning("alert.dedupe_not_marked", channel=route.index, event_name=event.name,
                            error_type=type(exc).__name__)
        log.info("alert.sent", channel=route.index, event_name=event.name, path="outbox")
        return "sent"

    def _state(self) -> StateStore | None:
        try:
            return self.state()
        except Exception:
            return None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.holds_the_lock():
                    self.deliver_due()
            except Exception as exc:  # the thread must outlive a full disk or a bad line
                log.error("alert.outbox_failed", error_type=type(exc).__name__)
            self.stopping.wait(POLL_S)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="alert-outbox", daemon=True)
        thread.start()
        return thread
