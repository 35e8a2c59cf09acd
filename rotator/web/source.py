"""The engine behind the page: one reader at a time, one fleet snapshot reused for `cache_s`.

Several tabs refreshing every few seconds must not turn into a scan of the key service and a read
of every sink each time; the snapshot says when it was taken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rotator.domain import KeyRef
from rotator.engine import Engine
from rotator.fleet import key_report, status_report
from rotator.protocols import Event


class Quiet:
    """Drops events: a page that looks must not alert (the workers' reconcile does)."""

    def publish(self, event: Event) -> None:
        return None


class FleetSource:
    def __init__(self, engine: Engine, *, cache_s: float = 10.0, history: int = 50, history_max: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.cache_s = cache_s
        self.history = history
        self.history_max = history_max
        self._clock = clock
        self._lock = threading.Lock()
        self._report: dict[str, Any] | None = None
        self._taken = 0.0

    def report(self) -> dict[str, Any]:
        """The fleet as `status --json --history` gives it, plus strategy, sinks and the counts."""
        with self._lock:
            if self._report is None or self._clock() - self._taken >= self.cache_s:
                self._report = status_report(self.engine, history=self.history)
                self._taken = self._clock()
            return self._report

    def key(self, ref: KeyRef) -> dict[str, Any]:
        """One key with its sinks' metadata and audit trail (not cached: someone asked for it)."""
        with self._lock:
            return key_report(self.engine, ref, history_max=self.history_max)

    @property
    def warn_before_days(self) -> int:
        return self.engine.policy.warn_before_days

    def close(self) -> None:
        self.engine.close()
        close = getattr(self.engine.keyservice, "close", None)
        if close is not None:
            close()
