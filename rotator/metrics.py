"""Prometheus metrics, computed at scrape time from Redis and the key service.

Counters live in Redis, so one endpoint reports every worker process, however many there are.
The key ages come from a scan cached for `cache_s` seconds so scrapes do not load the key service.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from rotator import view
from rotator.config import Settings
from rotator.errors import BudgetSpent
from rotator.scan import ScanRow, scan
from rotator.signing import REASONS
from rotator.state import DURATION_BUCKETS, RedisState
from rotator.view import Gauge, key_gauges

#: Ids only: an alias is free text from the key service (unbounded, and anything at all in a label).
LABELS = ["client_id", "key_id", "environment"]


class RotatorCollector:
    def __init__(self, settings: Settings, state: RedisState, cache_s: float = 30.0) -> None:
        self.settings = settings
        self.state = state
        self.cache_s = cache_s
        self._rows: list[ScanRow] = []
        self._rows_at = 0.0
        self._lock = threading.Lock()

    def _gauges(self) -> tuple[dict[str, list[Gauge]], float | None]:
        """The key gauges: from the view the workers published (`view.source = "published"`: this
        process holds no token; none while nothing is published), else from a scan of its own."""
        if self.settings.view.published:
            return view.gauges(self.state), self.state.view_published_at()
        return key_gauges(self._scan(), self.state, self.settings.policy.overlap_grace_s,
                          self.settings.keyservice.delete_after_s), None

    def _scan(self) -> list[ScanRow]:
        with self._lock:
            if time.monotonic() - self._rows_at > self.cache_s:
                from rotator.runtime import build_budget, build_keyservice

                # A look, like the page's: held back by a pause or a window at its reserve, not counted.
                budget = build_budget(self.settings, self.state).for_people()
                service = build_keyservice(self.settings.keyservice, budget=budget)
                held: list[BudgetSpent] = []
                try:
                    rows = list(scan(service, self.settings.policy.to_policy(), time.time(),
                                     self.settings.keyservice.clients, held))
                finally:
                    service.close()
                waiting = {spent.client_id for spent in held}  # paused: its last gauges until it is over
                self._rows = rows + [row for row in self._rows if row.key.client_id in waiting]
                self._rows_at = time.monotonic()
            return self._rows

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        age = GaugeMetricFamily("rotator_key_age_seconds", "Age of the key's current secret.", labels=LABELS)
        due = GaugeMetricFamily("rotator_key_next_due_timestamp_seconds", "When the key becomes due.",
                                labels=LABELS)
        revoke = GaugeMetricFamily("rotator_key_revoke_timestamp_seconds",
                                   "Retiring keys (overlap strategy): when the replaced key is revoked.", labels=LABELS)
        gauges, published_at = self._gauges()
        for labels, born in gauges["born"]:
            age.add_metric(labels, now - born)
        for labels, when in gauges["due"]:
            due.add_metric(labels, when)
        for labels, when in gauges["revoke"]:
            revoke.add_metric(labels, when)
        yield age
        yield due
        yield revoke
        m: dict[str, Any] = self.state.metrics()
        rotations = CounterMetricFamily("rotator_rotations", "Rotations by result.", labels=["result"])
        for result in ("succeeded", "recovered", "skipped", "failed", "at_risk"):
            rotations.add_metric([result], m["rotations"].get(result, 0))
        yield rotations
        d = m["duration"]
        buckets = [(("+Inf" if b == float("inf") else str(b)), d.get(f"le:{b}", 0.0)) for b in DURATION_BUCKETS]
        yield HistogramMetricFamily("rotator_rotation_duration_seconds", "Time from reset to verified.",
                                    buckets=buckets, sum_value=d.get("sum", 0.0))
        at_risk = sum(1 for a in self.state.attempts()
                      if a.phase == "storing" or now - a.started_at > 2 * self.settings.state.lock_ttl_s)
        yield GaugeMetricFamily("rotator_secrets_at_risk", "Reset secrets not yet stored in every sink.",
                                value=at_risk)
        refused = CounterMetricFamily("rotator_messages_refused", "Task messages a worker's gate refused, by reason.",
                                      labels=["reason"])
        counts = self.state.refused()
        for reason in REASONS:
            refused.add_metric([reason], counts.get(reason, 0))
        yield refused
        yield CounterMetricFamily("rotator_messages_unsigned_accepted",
                                  "Unsigned task messages run in signing.mode = transition.",
                                  value=self.state.unsigned_accepted())
        if self.settings.view.published:
            stamp = GaugeMetricFamily("rotator_view_published_timestamp_seconds",
                                      "When the workers last published the fleet view these key gauges come from.")
            if published_at is not None:
                stamp.add_metric([], published_at)
            yield stamp
        yield from budget_metrics(self.state, now)
        last = GaugeMetricFamily("rotator_last_scan_timestamp_seconds", "When the last scheduled scan ran.")
        if m["last_scan"] is not None:
            last.add_metric([], m["last_scan"])
        yield last


def budget_metrics(state: RedisState, now: float) -> Iterator[Metric]:
    """The fleet's rate budget per Client ID and window (1 = the key service's first published)."""
    from rotator.budget import views

    labels = ["client_id", "window"]
    left = GaugeMetricFamily("rotator_rate_budget_calls_left", "Calls rotator may still send in the window "
                             "(its allowance less what the fleet sent).", labels=labels)
    service = GaugeMetricFamily("rotator_rate_limit_calls_left", "Calls the Client ID has left in the window, "
                                "as the key service last said, less what the fleet sent since.", labels=labels)
    resets = GaugeMetricFamily("rotator_rate_limit_reset_timestamp_seconds", "When the window starts again.",
                               labels=labels)
    paused = GaugeMetricFamily("rotator_rate_budget_paused_until_timestamp_seconds",
                               "Nothing is sent for the Client ID until then (a 429's Retry-After).",
                               labels=["client_id"])
    for found in views(state.client, state.ns):
        for window in found.windows:
            names = [found.client_id, str(window.index)]
            left.add_metric(names, max(0, window.allowance - window.spent))
            service.add_metric(names, window.left)
            resets.add_metric(names, window.resets_at)
        if found.paused_until:
            paused.add_metric([found.client_id], found.paused_until)
    yield from (left, service, resets, paused)


def scrape_host(name: str) -> bool:
    """A Host a scraper sends (an IP address) or this machine's name for itself: never a DNS name
    that a page elsewhere could point at this address (DNS rebinding)."""
    from rotator.web.guard import is_loopback

    if is_loopback(name.rstrip(".")):
        return True
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def exposition_app(registry: CollectorRegistry) -> Any:
    """The scrape as an ASGI app that collects in a thread (prometheus_client's own app collects
    on the event loop, and a collect can wait on Redis or the key service: nothing else would be
    served meanwhile). One collect at a time; scrapes that come meanwhile wait for a thread."""
    from anyio import CapacityLimiter, to_thread
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    threads: list[CapacityLimiter] = []  # made on first use, inside the event loop

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not threads:
            threads.append(CapacityLimiter(1))
        body = await to_thread.run_sync(generate_latest, registry, limiter=threads[0])
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app


class MetricsServer:
    """The endpoint running in a background thread; `shutdown()` stops it and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread, sock: Any) -> None:
        self._server, self._thread, self._sock = server, thread, sock
        self.port: int = sock.getsockname()[1]

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


def serve(settings: Settings, port: int, host: str = "127.0.0.1", cache_s: float = 30.0) -> MetricsServer:
    """Start the endpoint in a background thread (on 127.0.0.1 unless told otherwise). It answers
    only to a Host that is an IP address or a loopback name (421 otherwise), so a web page elsewhere
    cannot read it through DNS rebinding (Prometheus scrapes by address), and runs under the status
    page's limits (rotator.web.limits: read time-out, connection cap, no request body)."""
    from rotator.runtime import build_state
    from rotator.web.guard import Receive, Scope, Send, host_name
    from rotator.web.limits import Limits, listening_socket, refuse, server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RotatorCollector(settings, build_state(settings), cache_s))
    app = exposition_app(registry)

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scrape_host(host_name(headers.get("host", ""))):
            await app(scope, receive, send)
            return
        await refuse(send, 421, "this endpoint answers only to an IP address or a loopback name as Host\n")

    sock = listening_socket(host, port)
    running = server(guarded, Limits.of(settings))
    thread = threading.Thread(target=running.run, kwargs={"sockets": [sock]}, daemon=True, name="metrics")
    thread.start()
    deadline = time.monotonic() + 10
    while not running.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return MetricsServer(running, thread, sock)
