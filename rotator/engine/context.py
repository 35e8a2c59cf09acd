"""What every step of a rotation shares, in one explicit object: the clients (key service, sinks,
state store, event publisher), the policy and its bounds, the clocks, the workers' Idempotency-Key
secret and the thread pool. Steps receive it; none reaches into another's state."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from rotator.fingerprint import Fingerprinter
from rotator.policy import (
    Policy,
    RotationWindow,
)
from rotator.protocols import (
    EventPublisher,
    KeyService,
    SecretSink,
    StateStore,
)


@dataclass
class Context:
    """The shared state of every step (built once per engine)."""

    keyservice: KeyService
    sinks: list[SecretSink]
    state: StateStore
    publisher: EventPublisher
    fingerprint: Fingerprinter
    policy: Policy
    sink_retry_s: float
    verify: bool
    lock_ttl_s: float
    clock: Callable[[], float]
    actor: str
    clients: list[str] | None  # None: every Client ID the key service lists
    horizon_s: float
    window: RotationWindow | None
    sleep: Callable[[float], None]
    monotonic: Callable[[], float]
    ik_mac: bytes = field(repr=False)  # the secret the Idempotency-Keys are derived with: never shown
    ik_id: str  # its public name (`protocol.derivation_id`)
    pool: Executor  # one thread per sink plus one for the token check
    call: threading.local  # who asked and why, for the rotation running in this thread
    # Reload hooks (`rotator.reload.run_all` over `[[reload]]`): what they are told of a stored
    # rotation -> each hook's outcome. None: no hook.
    reload: Callable[[dict[str, Any]], dict[str, str]] | None = None
