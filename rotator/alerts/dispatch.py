"""Which channel gets which event, de-duplication, and delivery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rotator import logs
from rotator.config import AlertConfig, Settings, read_credential
from rotator.domain import Severity
from rotator.protocols import Event, Notifier, StateStore

log = logs.get("rotator.alerts")


@dataclass(frozen=True)
class Route:
    index: int
    config: AlertConfig

    def wants(self, event: Event) -> bool:
        if self.config.events is not None and event.name not in self.config.events:
            return False
        return Severity[event.severity.upper()] >= self.config.severity

    def notifier(self) -> Notifier:
        url = self.config.resolved_url()
        if url.startswith("webhook+"):
            from rotator.alerts.webhook import SignedWebhook

            secret = read_credential(self.config.secret_env, self.config.secret_file, "webhook secret")
            return SignedWebhook(url, secret)
        from rotator.alerts.apprise_notifier import AppriseNotifier

        return AppriseNotifier(url)

    def dedupe_key(self, event: Event) -> str:
        """One alert per event, key and attempt within the window; an at-risk secret's alert is
        repeated as the time left before the key service forgets its answer passes each stage."""
        key = f"alert:{self.index}:{event.name}:{event.client_id}/{event.key_id}:{event.attempt_id or '-'}"
        left = (event.details or {}).get("time_left_s")
        return key + f":left<={countdown_stage(left)}h" if isinstance(left, int | float) else key


#: The stages (hours left) at which an at-risk alert is repeated however short the channel's window.
COUNTDOWN_STAGES_H = (24, 12, 6, 3, 1, 0)


def countdown_stage(time_left_s: float) -> int:
    """The smallest stage that still holds `time_left_s`: 24, 12, 6, 3, 1, or 0 (none left)."""
    return min(h for h in COUNTDOWN_STAGES_H if time_left_s <= h * 3600 or h == COUNTDOWN_STAGES_H[0])


def routes(settings: Settings) -> list[Route]:
    return [Route(i, a) for i, a in enumerate(settings.alerts)]


def first_time(route: Route, event: Event, state: StateStore) -> bool:
    """True unless this event for this key already went to this channel within its window."""
    if route.config.dedupe_window_s == 0:
        return True
    return state.once(route.dedupe_key(event), route.config.dedupe_window_s)


def _first_time_or_unknown(route: Route, event: Event, state: StateStore) -> bool:
    """`first_time`, or True when the state store cannot say (an alert twice beats none)."""
    try:
        return first_time(route, event, state)
    except Exception:
        return True


def already_sent(route: Route, event: Event, state: StateStore) -> bool:
    """Whether this event for this key already reached this channel within its window."""
    return route.config.dedupe_window_s != 0 and state.seen(route.dedupe_key(event))


def mark_sent(route: Route, event: Event, state: StateStore) -> None:
    if route.config.dedupe_window_s != 0:
        state.once(route.dedupe_key(event), route.config.dedupe_window_s)


def event_from_dict(data: dict[str, Any]) -> Event:
    return Event(data["event"], data["severity"], data["client_id"], data["key_id"], data.get("alias", ""),
                 data.get("environment", ""), data.get("age_days"), data.get("attempt_id"), data.get("error"),
                 data.get("time", 0.0), data.get("details") or None)


class DirectPublisher:
    """Delivers in the calling thread (tests, and one-shot CLI runs); errors are logged, not raised."""

    def __init__(self, settings: Settings, state: StateStore, only: list[Route] | None = None) -> None:
        self.routes = routes(settings) if only is None else only
        self.state = state

    def publish(self, event: Event) -> None:
        for route in self.routes:
            if route.wants(event) and _first_time_or_unknown(route, event, self.state):
                try:
                    route.notifier().send(event)
                except Exception as exc:
                    log.error("alert.failed", channel=route.index, event_name=event.name, error=str(exc))
