"""The engine behind the page: one fleet report at a time, one snapshot reused for `cache_s`, and
each page body rendered once per snapshot.

Several tabs refreshing every few seconds must not turn into a scan of the key service and a read
of every sink each time: a request that finds the snapshot too old starts one report, and every
request arriving meanwhile waits for that same report (never a report each). Reports and renders
run in worker threads of their own and are awaited, so nothing else waits for them: `/healthz`
answers on the event loop, and a key's page is built in threads of its own (rotator.web.app),
without waiting for a fleet report and without taking its threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from anyio import CapacityLimiter, to_thread

from rotator import view
from rotator.config import PolicyConfig
from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.fleet import key_report, status_report
from rotator.protocols import Event
from rotator.state import RedisState

T = TypeVar("T")
#: Threads for the fleet's report and its renders (one report at a time, a few bodies).
FLEET_THREADS = 4


class Quiet:
    """Drops events: a page that looks must not alert (the workers' reconcile does)."""

    def publish(self, event: Event) -> None:
        return None


def _shared(task: asyncio.Future[T]) -> asyncio.Future[T]:
    """Awaited by every request that needs it; one request going away does not cancel it for the
    others, and an error nobody is left to see is not reported as never retrieved."""
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


class Snapshot:
    """One fleet report, when it was taken, and the bodies rendered from it (each once)."""

    def __init__(self, report: dict[str, Any], taken: float, threads: CapacityLimiter | None = None) -> None:
        self.report = report
        self.taken = taken
        self._threads = threads
        self._bodies: dict[Hashable, asyncio.Future[Any]] = {}

    async def body(self, name: Hashable, render: Callable[[], T]) -> T:
        """The body `name` (a template and the prefix the app is mounted under, the JSON):
        rendered once in a worker thread, then the same bytes for every request. A render that
        failed is tried again by the next request."""
        task = self._bodies.get(name)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._bodies[name] = _shared(asyncio.ensure_future(
                to_thread.run_sync(render, limiter=self._threads)))
        result: T = await asyncio.shield(task)
        return result


class CachedSource:
    """One report at a time, reused for `cache_s`; subclasses say where a report comes from."""

    def __init__(self, *, cache_s: float = 10.0, history: int = 50, history_max: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache_s = cache_s
        self.history = history
        self.history_max = history_max
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._flight: asyncio.Future[Snapshot] | None = None  # the report being taken, if one is
        # The fleet's report and renders have threads of their own: key pages, however many are
        # asked for, never hold one of them (made on first use, inside the event loop).
        self._threads: CapacityLimiter | None = None

    async def snapshot(self) -> Snapshot:
        """The fleet as `status --json --history` gives it, plus strategy, sinks and the counts:
        the cached one while younger than `cache_s`, else the one being taken (started here when
        none is). Only the event loop touches these fields, so no lock is needed."""
        current = self._snapshot
        if current is not None and self._clock() - current.taken < self.cache_s:
            return current
        if self._flight is None:
            self._flight = _shared(asyncio.ensure_future(self._take()))
        return await asyncio.shield(self._flight)

    async def _take(self) -> Snapshot:
        if self._threads is None:
            self._threads = CapacityLimiter(FLEET_THREADS)
        try:
            report = await to_thread.run_sync(self.report, limiter=self._threads)
            self._snapshot = Snapshot(report, self._clock(), self._threads)
            return self._snapshot
        finally:
            self._flight = None

    def report(self) -> dict[str, Any]:
        """One fresh report (blocking; the page goes through `snapshot`)."""
        raise NotImplementedError

    def key(self, ref: KeyRef) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def warn_before_days(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        return None


class FleetSource(CachedSource):
    """The fleet as this process sees it: a scan of the key service and a read of each sink."""

    def __init__(self, engine: Engine, **options: Any) -> None:
        super().__init__(**options)
        self.engine = engine

    def report(self) -> dict[str, Any]:
        return status_report(self.engine, history=self.history)

    def key(self, ref: KeyRef) -> dict[str, Any]:
        """One key with its sinks' metadata and audit trail (not cached: someone asked for it).
        Blocking and independent of the fleet report: a key's page never waits for one."""
        return key_report(self.engine, ref, history_max=self.history_max)

    @property
    def warn_before_days(self) -> int:
        return self.engine.policy.warn_before_days

    def close(self) -> None:
        self.engine.close()
        close = getattr(self.engine.keyservice, "close", None)
        if close is not None:
            close()


class PublishedSource(CachedSource):
    """The fleet as the workers last published it (rotator.view): this process holds nothing but a
    Redis user that may read, so a compromised page can reset nothing."""

    def __init__(self, state: RedisState, **options: Any) -> None:
        super().__init__(**options)
        self.state = state
        self._warn_days = int(PolicyConfig.model_fields["warn_before_days"].default)  # until a view says

    def report(self) -> dict[str, Any]:
        published = view.read(self.state)
        self._warn_days = int(published.get("warn_before_days", self._warn_days))
        return view.report(self.state, self.history, published)

    def key(self, ref: KeyRef) -> dict[str, Any]:
        """From the report in hand when there is one: a key's page does not read the whole view again."""
        current = self._snapshot
        return view.key_report(self.state, ref, self.history_max, current.report["keys"] if current else None)

    @property
    def warn_before_days(self) -> int:
        return self._warn_days

    def close(self) -> None:
        self.state.client.close()
