"""rotator.signing wired into Celery: every publish is stamped, every delivery passes the gate.

The gate runs in the worker's main process, in the strategy that turns a delivered message into a
request, before Celery logs it, before a pool process sees it. A refused message is acknowledged
(a forgery must not come back) and nothing else happens: no key-service call, no sink write, no
webhook. It is counted in Redis (`rotator_messages_refused_total{reason}`), logged once with its
reason and never its arguments, and raises one `security.forged_message` alert per
`ALERT_EVERY_S` fleet-wide. An accepted message's id is recorded when the message is acknowledged,
so a replay of a consumed message is refused while a redelivery of an unacknowledged one (a
worker killed mid-task) still runs; the generation check keeps that second delivery harmless.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import redis
from celery import Task, current_task
from celery.app.amqp import AMQP
from celery.worker.consumer import Consumer
from celery.worker.strategy import default as default_strategy

from rotator import logs
from rotator.config import Settings, process_settings
from rotator.events import SEVERITY, LogPublisher
from rotator.protocols import Event, EventPublisher
from rotator.safety import private_state_dir
from rotator.signing import (
    CLOCK_SKEW_S,
    HEADER,
    Signer,
    Verdict,
    Verifier,
    default_name,
    load_or_make,
    parse_public,
    read_private_key,
    valid_name,
)
from rotator.state import RedisState

#: What a task message's body may embed besides its arguments: anything else would land in the
#: running task's request (Celery merges it in), over the verified stamp the actor is read from.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
#: Refusals that are counted and logged but raise no alert (nothing was forged).
QUIET_REASONS = frozenset({"already_done"})
#: The actor the audit trail records for a message nobody signed (`signing.mode` off or transition).
UNSIGNED_ACTOR = "unsigned-message"
ALERT_EVERY_S = 900
TIMEOUT_S = 2.0  # the gate runs in the loop that takes tasks: a hung Redis must not hold it long
log = logs.get("rotator.gate")


_settings = process_settings
#: Makes the publisher of the forged-message alert: rotator.tasks hands over its own (the gate sits
#: below the tasks, so it does not import them); unset, the alert is a log line only.
_alert_publisher: Callable[[], EventPublisher] = LogPublisher


def alert_through(make_publisher: Callable[[], EventPublisher]) -> None:
    """Send the gate's alerts through this publisher (the worker's, which notifies every channel)."""
    global _alert_publisher
    _alert_publisher = make_publisher


def key_path(settings: Settings) -> Path:
    """`signing.private_key_file`, else `signing.key` in the private state directory."""
    return settings.signing.private_key_file or private_state_dir() / "signing.key"


def make_signer(settings: Settings) -> Signer | None:
    """This process's signer; None when `signing.mode` is off. The embedded default key is made on
    first use; a configured key file must exist (check-config says so)."""
    g = settings.signing
    if g.mode == "off":
        return None
    key = load_or_make(key_path(settings)) if g.private_key_file is None else read_private_key(g.private_key_file)
    return Signer(g.name or default_name(), key)


def make_verifier(settings: Settings, me: Signer) -> Verifier:
    g = settings.signing
    trusted = {name: [parse_public(k) for k in keys] for name, keys in g.trusted.items()}
    trusted.setdefault(me.name, []).append(me.key.public_key())  # a worker trusts its own retries
    return Verifier({n: tuple(k) for n, k in trusted.items()}, frozenset({*g.relays, me.name}), float(g.max_age_s))


@cache
def signer() -> Signer | None:
    return make_signer(_settings())


class SignedAMQP(AMQP):  # type: ignore[misc]
    """Celery's message sender with every message signed on its way out (beat, a worker, the CLI).
    Here and not in a `before_task_publish` handler: Celery logs and swallows a handler's error, so
    a message that could not be signed would leave unsigned; here the publish itself fails."""

    def _create_task_sender(self) -> Callable[..., Any]:
        send: Callable[..., Any] = super()._create_task_sender()

        def signed(producer: Any, name: str, message: Any, *args: Any, headers: dict[str, Any] | None = None,
                   **kwargs: Any) -> Any:
            own, _, body, _ = message
            if headers:  # what Celery would merge in: signed with the rest
                own.update(headers)
            me = signer()
            if me is not None:
                own[HEADER] = me.stamp(own, body, _origin(me.name), time.time())
            return send(producer, name, message, *args, **kwargs)

        return signed


def _origin(me: str) -> str:
    """Whose action a message is: inside a task (a retry, the scan's fan-out) the actor of the
    message that task came from; anywhere else this process's signer."""
    return actor_of(getattr(current_task, "request", None) if current_task else None) or me


def actor_of(request: Any) -> str | None:
    """The verified actor of the message a task is running for; None for a direct call. The gate has
    checked the stamp before this message reached the pool, so its origin is the signer's word."""
    if request is None or getattr(request, "called_directly", True):
        return None
    stamp = request.get(HEADER) if hasattr(request, "get") else None
    if signer() is None or not isinstance(stamp, dict) or not isinstance(stamp.get("origin"), str):
        return UNSIGNED_ACTOR
    return valid_name(stamp["origin"])


class Gate:
    """The worker's check of one delivered message, with its Redis records."""

    def __init__(self, settings: Settings, me: Signer, state: RedisState) -> None:
        self.mode = settings.signing.mode
        self.amqp = settings.celery.broker_is_amqp()  # whose `redelivered` flag only the broker sets
        self.verifier = make_verifier(settings, me)
        self.record_ttl_s = int(settings.signing.max_age_s + CLOCK_SKEW_S)
        self.state = state
        self.redis_failing = False

    def admit(self, message: Any) -> Verdict:
        headers = message.headers or {}
        try:
            body = message.decode()
        except Exception:
            return Verdict(False, "malformed", detail="the body does not decode")
        if not _plain_body(body):
            return Verdict(False, "malformed", detail="the body is not [args, kwargs, {callbacks, errbacks, chain, "
                                                      "chord}]")
        if HEADER not in headers and self.mode == "transition":
            self._quietly(self.state.count_unsigned_accepted)
            log.warning("message.unsigned_accepted", task=_named(headers, "task"), task_id=_named(headers, "id"))
            return Verdict(True, actor=UNSIGNED_ACTOR)
        verdict = self.verifier.check(headers, body, time.time())
        if verdict.accepted and self._quietly(lambda: self.state.consumed(verdict.mid)):
            if self.amqp and (message.delivery_info or {}).get("redelivered"):
                # RabbitMQ delivers it again although its acknowledgement was sent (the broker drops one
                # sent past its consumer_timeout without an error here): the work is done. Counted, not
                # alerted; a client that requeues a copy it took lands here too, and runs nothing.
                return Verdict(False, "already_done", signer=verdict.signer, mid=verdict.mid,
                               detail="delivered again after its acknowledgement")
            return Verdict(False, "replayed", signer=verdict.signer, mid=verdict.mid,
                           detail="this message id was consumed already")
        return verdict

    def consumed(self, mid: str) -> None:
        self._quietly(lambda: self.state.mark_consumed(mid, self.record_ttl_s))

    def refuse(self, verdict: Verdict, headers: Any) -> None:
        task = _named(headers, "task")
        self._quietly(lambda: self.state.count_refused(verdict.reason))
        log.error("message.refused", reason=verdict.reason, task=task, task_id=_named(headers, "id"),
                  signer=verdict.signer or None, detail=verdict.detail or None)
        if verdict.reason in QUIET_REASONS:
            return
        slot = int(time.time() // ALERT_EVERY_S)
        if self._quietly(lambda: self.state.once(f"forged-alert:{slot}", ALERT_EVERY_S)):
            self._alert(verdict, task, slot)

    def _alert(self, verdict: Verdict, task: str, slot: int) -> None:
        event = Event("security.forged_message", SEVERITY["security.forged_message"], "-", "-",
                      attempt_id=f"slot-{slot}", time=time.time(),
                      error=(f"a worker refused a task message ({verdict.reason}); more within "
                             f"{ALERT_EVERY_S // 60} minutes are counted in rotator_messages_refused_total, "
                             "not alerted"),
                      details={"reason": verdict.reason, "task": task,
                               "signer": verdict.signer if verdict.signer in self.verifier.trusted else ""})
        try:
            _alert_publisher().publish(event)
        except Exception as exc:  # the refusal stands whether or not the alert goes out
            log.error("message.alert_failed", error=type(exc).__name__)

    def _quietly(self, call: Callable[[], Any]) -> Any:
        """A Redis call of the gate; a failing Redis is logged once and answers None (not consumed:
        the engine itself needs Redis, so a message let through then cannot reset anything)."""
        try:
            result = call()
        except redis.RedisError as exc:
            if not self.redis_failing:
                log.error("message.gate_redis_failed", error=type(exc).__name__)
            self.redis_failing = True
            return None
        self.redis_failing = False
        return result


@cache
def gate() -> Gate | None:
    me = signer()
    if me is None:
        return None
    s = _settings()
    return Gate(s, me, RedisState.from_url(s.state.url(), s.state.namespace, timeout_s=TIMEOUT_S))


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy behind the gate (`Task.Strategy`)."""
    handle: Callable[..., Any] = default_strategy(task, app, consumer, **kwargs)
    the_gate = gate()
    if the_gate is None:
        return handle

    def gated(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **more: Any) -> Any:
        verdict = the_gate.admit(message)
        if not verdict.accepted:
            the_gate.refuse(verdict, message.headers)
            with contextlib.suppress(*consumer.connection_errors):
                message.ack()
            return None
        if verdict.mid:
            _record_when_settled(message, verdict.mid, the_gate)
        return handle(message, body, ack, reject, callbacks, **more)

    return gated


def _named(headers: Any, field: str) -> str:
    """A header a sender chose (the task name, its id), cut to a signer name's characters for a log line."""
    return valid_name(str((headers or {}).get(field, "?")))


def _plain_body(body: Any) -> bool:
    """`[args, kwargs, embed]` with nothing in the embed but callbacks, errbacks, chain and chord."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        return False
    args, kwargs, embed = body
    return (isinstance(args, list | tuple) and isinstance(kwargs, dict) and isinstance(embed, dict)
            and set(embed) <= EMBED_KEYS)


def _record_when_settled(message: Any, mid: str, the_gate: Gate) -> None:
    """Record the message id once the broker has taken the acknowledgement (or a reject that
    drops it): an acknowledgement that fails (RabbitMQ closed the channel past its
    consumer_timeout, Redis down) leaves the message to be delivered again, and accepted."""
    ack, reject = message.ack, message.reject

    def acked(*args: Any, **kwargs: Any) -> Any:
        result = ack(*args, **kwargs)
        the_gate.consumed(mid)
        return result

    def rejected(requeue: bool = False) -> Any:
        result = reject(requeue=requeue)
        if not requeue:
            the_gate.consumed(mid)
        return result

    message.ack, message.reject = acked, rejected


class GatedConsumer(Consumer):  # type: ignore[misc]
    """Messages Celery turns away before any task's strategy (an unknown task name, an unknown
    format, a body that does not decode) are refused like forged ones: counted, logged without
    their body (Celery's own lines quote it whole), alerted, dropped."""

    def _refuse(self, message: Any, reason: str, detail: str) -> None:
        the_gate = gate()
        headers = getattr(message, "headers", None) or {}
        if the_gate is not None:
            the_gate.refuse(Verdict(False, reason, detail=detail), headers)
        else:
            log.error("message.refused", reason=reason, task=_named(headers, "task"), detail=detail)
        with contextlib.suppress(*self.connection_errors):
            message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Any) -> None:
        self._refuse(message, "unknown_task", "no such task here")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, "malformed", "not a task message")

    def on_invalid_task(self, body: Any, message: Any, exc: Any) -> None:
        self._refuse(message, "malformed", "an invalid task message")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse(message, "malformed", f"the body does not decode ({type(exc).__name__})")


class GatedTask(Task):  # type: ignore[misc]
    """The base of rotator's tasks: deliveries go through `strategy`."""

    Strategy = "rotator.gate:strategy"
