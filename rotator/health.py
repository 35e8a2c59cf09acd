"""`check-config --ping`: reach every configured service and say which answered. The Redis and
broker pings here also serve `rotator health` (`rotator.probe`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import quote, unquote, urlsplit

import redis

from rotator.aliases import AliasTemplate
from rotator.config import REDIS_SCHEMES, Settings
from rotator.errors import RotatorError
from rotator.protocols import KeyService, SecretSink
from rotator.safety import redact_urls_in, strip_credentials, terminal_safe

PING_TIMEOUT_S = 3.0


def view_problem(settings: Settings) -> str | None:
    """The fleet view the workers publish is there (a reader shows nothing without it)."""
    from rotator.state import RedisState

    try:
        if not RedisState.from_url(settings.state.url(), settings.state.namespace, timeout_s=PING_TIMEOUT_S).has_view():
            return ("the workers have published no fleet view (or not within three intervals): "
                    "view.publish_every_s must be above 0 for beat and the workers, and they must be running")
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: the view could not be read"
    return None


def ping_all(settings: Settings) -> Iterator[tuple[str, str | None]]:
    """(service, None) when it answered, (service, reason) when not."""
    if settings.reader_only:
        yield "state redis", ping_redis(settings.state.url)
        yield "fleet view", view_problem(settings)
        return
    from rotator.runtime import build_keyservice, build_sinks

    where = f"keyservice {settings.keyservice.kind}"
    service: KeyService | None = None
    try:
        service = build_keyservice(settings.keyservice)
        next(iter(service.list_clients()), None)
        yield where, None
        yield f"overlap strategy: {overlap_mode(service)}", None
    except RotatorError as exc:
        yield where, str(exc)
    try:
        yield "state redis", ping_redis(settings.state.url)
        yield "audit history", audit_key_problem(settings)
        if settings.celery.broker_is_amqp() or settings.celery.broker_url.scheme in REDIS_SCHEMES:
            yield "celery broker", ping_broker(settings)
        try:
            sinks = build_sinks(settings)
        except RotatorError as exc:
            yield "sinks", str(exc)
            return
        for sink in sinks:
            try:
                sink.ping()
                yield sink.describe(), None
            except RotatorError as exc:
                yield sink.describe(), str(exc)
            finally:
                sink.close()
        if service is not None:
            yield "sink places", _shared_places(settings, service, sinks)
    finally:
        if service is not None:
            service.close()


def _shared_places(settings: Settings, service: KeyService, sinks: list[SecretSink]) -> str | None:
    """Whether two keys would share a place in a sink (aliases that slug alike under `{alias}`)."""
    from rotator.places import PlaceIndex
    from rotator.scan import every_key

    try:
        places = PlaceIndex(sinks).add_all(every_key(service, settings.keyservice.clients))
    except RotatorError as exc:
        return f"not checked: {exc}"
    if not places.conflicts:
        return None
    first = next(iter(places.conflicts.values()))
    return f"{len(places.conflicts)} keys share a place with another key; e.g. {first}"


def audit_key_problem(settings: Settings) -> str | None:
    """A configuration without `audit.hmac_key_file` next to a keyed audit history: every history
    entry it would write is refused (rotator.state)."""
    if settings.audit.hmac_key_file is not None:
        return None
    from rotator.runtime import build_state

    try:
        keyed = build_state(settings, timeout_s=5).audit_keyed()
    except Exception:
        return None  # the state redis line says why
    if keyed:
        return ("the history is keyed, and this configuration has no audit.hmac_key_file: the history entries it "
                "writes would be refused")
    return None


def overlap_mode(service: KeyService) -> str:
    """Which mode of the overlap strategy applies with this key service (`check-config --ping`)."""
    if getattr(service, "cannot_reset", None) is not None:
        return "the key service's own new keys (it cannot reset)"
    template = getattr(service, "alias_template", None)
    if isinstance(template, AliasTemplate):
        return (f"alias template {template.text!r} (keyservice.successors = false): a new key under a derived alias, "
                "found at its base alias ({base_alias})")
    return "successors (Replaces)"


def ping_redis(full_url: Callable[[], str]) -> str | None:
    """One PING of at most `PING_TIMEOUT_S`: None when Redis answered, else one line without the password."""
    try:
        redis.Redis.from_url(full_url(), socket_timeout=PING_TIMEOUT_S, socket_connect_timeout=PING_TIMEOUT_S).ping()
        return None
    except RotatorError as exc:  # the password variable or file went missing since loading
        return str(exc)
    except redis.RedisError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {terminal_safe(redact_urls_in(detail))[:200]}"


def ping_broker(settings: Settings) -> str | None:
    """The Celery broker answers: RabbitMQ with one login, Redis with one PING."""
    celery = settings.celery
    return _ping_amqp(celery.broker) if celery.broker_is_amqp() else ping_redis(celery.broker)


def _ping_amqp(full_url: Callable[[], str]) -> str | None:
    """Open one connection to a RabbitMQ broker (a login on its vhost), one try of at most
    `PING_TIMEOUT_S`: None when it answered, else one line naming the error and where, without the
    password."""
    from kombu.connection import Connection

    try:
        url = full_url()
    except RotatorError as exc:  # the password variable or file went missing since loading
        return str(exc)
    parts = urlsplit(url)
    password = parts.password or ""
    try:
        with Connection(url, connect_timeout=PING_TIMEOUT_S) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=0, timeout=PING_TIMEOUT_S)
        return None
    except Exception as exc:  # any failure is the answer: refused, TLS, login, vhost, timeout
        text = " ".join(str(exc).split()) or "no message"
        for secret in {password, unquote(password), quote(unquote(password), safe="")} - {""}:
            text = text.replace(secret, "***")
        text = terminal_safe(redact_urls_in(text))[:200]
        return f"{type(exc).__name__}: {text} ({strip_credentials(url)})"
