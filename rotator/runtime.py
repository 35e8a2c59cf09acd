"""Wire settings into a ready engine: one place, used by the CLI and the Celery tasks."""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rotator.aliases import AliasTemplate
from rotator.config import KeyServiceConfig, Settings, read_credential
from rotator.errors import ConfigError, ConfigProblem, PermanentError
from rotator.events import LogPublisher
from rotator.fingerprint import Fingerprinter
from rotator.keyservice import registry as keyservices
from rotator.protocols import EventPublisher, KeyService, SecretSink
from rotator.safety import excerpt, might_be_secret
from rotator.sinks import registry
from rotator.state import RedisState

if TYPE_CHECKING:
    from rotator.budget import RateBudget
    from rotator.engine import Engine


def build_fingerprinter(settings: Settings) -> Fingerprinter:
    engine = settings.engine
    return Fingerprinter(
        read_credential(engine.fingerprint_key_env, engine.fingerprint_key_file, "fingerprint key")
    )


def build_idempotency_secret(settings: Settings) -> bytes | None:
    """The workers' own secret for the Idempotency-Keys (None: not configured, derived from the
    fingerprint key as before the setting existed)."""
    engine = settings.engine
    if engine.idempotency_key_env is None and engine.idempotency_key_file is None:
        return None
    raw = read_credential(engine.idempotency_key_env, engine.idempotency_key_file, "Idempotency-Key secret").encode()
    if len(raw) < 16:
        raise PermanentError("the Idempotency-Key secret must be at least 16 bytes")
    return hmac.new(raw, b"rotator-derive\x00idempotency-key", hashlib.sha256).digest()


def build_sinks(settings: Settings, fingerprint: Fingerprinter | None = None) -> list[SecretSink]:
    fp = fingerprint or build_fingerprinter(settings)
    return [registry.build(s.kind, s.options, fp) for s in settings.sinks]


def build_state(settings: Settings, timeout_s: float = 10.0) -> RedisState:
    key_file = settings.audit.hmac_key_file
    audit_key = read_credential(None, key_file, "audit HMAC key").encode() if key_file is not None else None
    return RedisState.from_url(settings.state.url(), settings.state.namespace, settings.state.history_max,
                               timeout_s=timeout_s, audit_key=audit_key)


def build_budget(settings: Settings, state: RedisState, fail_open: bool = False) -> RateBudget:
    """The fleet's share of the key service's rate limit, kept in the state store; `fail_open`
    (a scan, which needs no state store otherwise): calls go unmetered while it does not answer."""
    from rotator.budget import RateBudget

    config = settings.keyservice
    return RateBudget(state.client, state.ns, share=config.max_share_of_rate_limit,
                      reserve=config.rate_limit_reserve, requests_per_second=config.requests_per_second,
                      burst=config.burst, longest_wait_s=config.retry_max_wait_s, fail_open=fail_open)


def build_engine(settings: Settings, publisher: EventPublisher | None = None, actor: str | None = None,
                 looking: bool = False) -> Engine:
    """`looking`: the engine of what a person looks at (`status`, the page), whose calls a spent
    rate budget does not hold back (`RateBudget.for_people`)."""
    from rotator.engine import Engine  # `rotator scan` needs none of it

    fingerprint = build_fingerprinter(settings)
    state = build_state(settings)
    budget = build_budget(settings, state)
    engine = Engine(
        build_keyservice(settings.keyservice, settings.policy.overlap_grace_s,
                         budget=budget.for_people() if looking else budget),
        build_sinks(settings, fingerprint), state,
        publisher or LogPublisher(), fingerprint, settings.policy.to_policy(),
        sink_retry_s=settings.engine.sink_retry_s, verify=settings.engine.verify,
        lock_ttl_s=settings.state.lock_ttl_s, actor=actor or _whoami(), clients=settings.keyservice.clients,
        horizon_s=settings.engine.in_doubt_horizon_s, window=settings.policy.rotation_window(),
        idempotency_secret=build_idempotency_secret(settings),
        reload=build_reload(settings),
    )
    return engine


def build_reload(settings: Settings) -> Callable[[dict[str, Any]], dict[str, str]] | None:
    """`[[reload]]`'s hooks, run by the engine once every sink holds a new secret (None: none)."""
    if not settings.reload:
        return None
    from rotator import reload

    hooks = reload.build(settings.reload)
    return lambda told: reload.run_all(hooks, told)


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def build_keyservice(config: KeyServiceConfig, grace_s: float = 7 * 86_400,
                     budget: RateBudget | None = None) -> KeyService:
    """The adapter a configuration names (`kind`, through `rotator.keyservice.registry`). `grace_s`
    is the policy's overlap grace (AWS IAM: when a deactivated key may be deleted); `budget`, the
    fleet's rate budget, goes to an adapter that spends from one (a `budget` attribute). A plugin's
    builder that fails on its own options is a configuration problem in one line, never a traceback."""
    builder = keyservices.resolve(config.kind)
    try:
        service = builder(config, grace_s)
        if budget is not None and hasattr(service, "budget"):
            service.budget = budget
        if not config.successors and config.kind in ("http", "emulator"):
            # The engine wraps it (`rotator.engine.successors`): the overlap strategy's alias-template mode.
            service.alias_template = AliasTemplate(config.alias_template)  # type: ignore[attr-defined]
        return service
    except KeyError as exc:
        if config.kind in keyservices.BUILTIN:
            raise
        name = exc.args[0] if exc.args else ""
        shown = excerpt(name) if isinstance(name, str) and not might_be_secret(name) else "(not shown)"
        raise ConfigError([ConfigProblem("[keyservice]", "keyservice.options", (
            f"the {config.kind!r} key service needs option {shown}"))]) from None
    except (TypeError, ValueError) as exc:
        if config.kind in keyservices.BUILTIN:
            raise
        raise ConfigError([ConfigProblem("[keyservice]", "keyservice.options", (
            f"the {config.kind!r} key service cannot be built from its options ({type(exc).__name__})"))]) from None
