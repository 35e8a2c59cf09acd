"""Any Apprise URL (Slack, Teams, e-mail, PagerDuty, Opsgenie, json://…) as a notifier."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import apprise

from rotator.errors import PermanentError, TransientError
from rotator.protocols import Event

_TYPES = {"info": apprise.NotifyType.INFO, "warning": apprise.NotifyType.WARNING,
          "error": apprise.NotifyType.FAILURE, "critical": apprise.NotifyType.FAILURE}


@contextlib.contextmanager
def quiet_apprise() -> Iterator[None]:
    """Apprise logs a URL it cannot parse whole, credentials and all: not while it reads ours."""
    logger = logging.getLogger("apprise")
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def plugin_for(url: str) -> Any:
    """Apprise's plugin for `url`, or None when it does not understand it (never logging the URL)."""
    with quiet_apprise():
        return apprise.Apprise.instantiate(url, suppress_exceptions=True)


def described(url: str) -> str:
    """A URL named in messages: its scheme, host and port only (a path, a query or a header may hold
    a token that Apprise's own privacy mode leaves in place)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}/…"


class AppriseNotifier:
    def __init__(self, url: str) -> None:
        self._apprise = apprise.Apprise()
        with quiet_apprise():
            added = self._apprise.add(url)
        if not added:
            raise PermanentError("alert URL is not one Apprise understands")
        self._describe = described(url)

    def describe(self) -> str:
        return self._describe

    def send(self, event: Event) -> None:
        title = f"[{event.severity.upper()}] {event.name} {event.client_id}/{event.key_id}"
        body = "\n".join([f"event: {event.name}", f"key: {event.client_id}/{event.key_id} ({event.alias})",
                          *(f"error: {event.error}",) * bool(event.error),
                          json.dumps(event.to_dict(), sort_keys=True)])
        if not self._apprise.notify(title=title, body=body, notify_type=_TYPES[event.severity]):
            raise TransientError(f"{self._describe}: delivery failed")
