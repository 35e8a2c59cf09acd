"""Any Apprise URL (Slack, Teams, e-mail, PagerDuty, Opsgenie, json://…) as a notifier."""

from __future__ import annotations

import json

import apprise

from rotator.errors import PermanentError, TransientError
from rotator.protocols import Event

_TYPES = {"info": apprise.NotifyType.INFO, "warning": apprise.NotifyType.WARNING,
          "error": apprise.NotifyType.FAILURE, "critical": apprise.NotifyType.FAILURE}


class AppriseNotifier:
    def __init__(self, url: str) -> None:
        self._apprise = apprise.Apprise()
        if not self._apprise.add(url):
            # Apprise's privacy mode masks credentials in the URL for this message.
            raise PermanentError("alert URL is not one Apprise understands")
        self._describe = ", ".join(s.url(privacy=True) for s in self._apprise)  # type: ignore[no-untyped-call]

    def describe(self) -> str:
        return self._describe

    def send(self, event: Event) -> None:
        title = f"[{event.severity.upper()}] {event.name} {event.client_id}/{event.key_id}"
        body = "\n".join([f"event: {event.name}", f"key: {event.client_id}/{event.key_id} ({event.alias})",
                          *(f"error: {event.error}",) * bool(event.error),
                          json.dumps(event.to_dict(), sort_keys=True)])
        if not self._apprise.notify(title=title, body=body, notify_type=_TYPES[event.severity]):
            raise TransientError(f"{self._describe}: delivery failed")
