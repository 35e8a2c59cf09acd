"""Event names, their severities, and publishers that need no network."""

from __future__ import annotations

import threading
from typing import Any, Final

from rotator import logs
from rotator.protocols import Event

SEVERITY: Final = {
    "rotation.succeeded": "info",
    "rotation.failed": "error",
    "rotation.secret_at_risk": "critical",
    "rotation.in_doubt": "error",
    "rotation.recovered": "warning",
    "rotation.deferred": "warning",
    "key.due_soon": "warning",
    "key.overdue": "error",
    "drift.detected": "critical",
    "keyservice.protocol_error": "critical",
    "key.retiring": "info",
    "key.deactivated": "info",
    "key.revoked": "info",
    "key.still_in_use": "error",
    "reload.failed": "error",
    "security.forged_message": "critical",
}
MAX_ERROR_LEN = 500


def sanitize(text: str | None) -> str | None:
    """Bound an error text for events; errors are built without secrets, this only bounds size."""
    if text is None:
        return None
    return text if len(text) <= MAX_ERROR_LEN else text[: MAX_ERROR_LEN - 1] + "…"


class LogPublisher:
    """Writes every event as a structured log line."""

    def __init__(self) -> None:
        self._log = logs.get("rotator.events")

    def publish(self, event: Event) -> None:
        level = {"info": "info", "warning": "warning", "error": "error", "critical": "critical"}[event.severity]
        getattr(self._log, level)(event.name, **{k: v for k, v in event.to_dict().items() if k != "event"})


class CapturePublisher:
    """Keeps events in memory: for tests and library users."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def names(self) -> list[str]:
        return [e.name for e in self.events]


class FanOut:
    def __init__(self, *publishers: Any) -> None:
        self.publishers = publishers

    def publish(self, event: Event) -> None:
        for publisher in self.publishers:
            publisher.publish(event)
