"""One error tree for the whole project.

Callers decide what to retry by class alone: a `TransientError` may succeed if tried again, a
`PermanentError` will not. Messages name the operation (method and path, sink and location) and
never carry a secret or a credential.
"""

from __future__ import annotations

from datetime import UTC, datetime


class RotatorError(Exception):
    """Root of every error rotator raises on purpose."""

    status: int | None = None  # the HTTP status behind it, where there was one
    kind: str = ""  # the error `Type` the key service named, where it named a clean one


class TransientError(RotatorError):
    """Safe to retry: a time-out, a dropped connection, a 5xx, throttling, a sealed Vault."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnansweredError(TransientError):
    """No answer came back (a time-out, a dropped connection): the request may still have run."""


class ServerError(TransientError):
    """A 5xx. Proves nothing about a write: a proxy may answer it while the origin commits."""


class BusyError(TransientError):
    """A 409 with Retry-After: the same Idempotency-Key is still running; repeat it."""


class ThrottledError(TransientError):
    """A 429: the call did not run; retry later."""


class InDoubtError(TransientError):
    """A write whose outcome is unknown (no answer, a 5xx, a cut or unusable answer): it may have
    run. Only a replay of its Idempotency-Key or the key's generation can settle it."""


class UnusableAnswerError(InDoubtError):
    """A write answered 200 with something that is not a usable answer for the request (cut, not
    JSON, another key named, a secret that is no text): it ran, the key service broke its contract."""


class RefusedError(RotatorError):
    """The key service answered a write with a 4xx: it did not run. `stored`: the refusal is the
    one the key service stored under the call's Idempotency-Key (read back), so that key never ran."""

    def __init__(self, message: str, *, status: int | None, stored: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.stored = stored


class PermanentError(RotatorError):
    """Retrying the same call will not help: a person or a config change must act."""


class BudgetSpent(Exception):
    """The fleet's share of the key service's rate limit is spent (or a 429 paused it) until
    `until` (Unix time): the call was not sent. Deliberately outside `RotatorError`, so that no
    handler of failures takes it for one: what it stops is deferred, never failed."""

    def __init__(self, client_id: str, until: float, why: str) -> None:
        self.client_id = client_id
        self.until = until
        self.why = why
        super().__init__(f"the key service's rate budget for {client_id} is spent until "
                         f"{_clock(until)} ({describe_hold(why)}); this call was not sent")


def describe_hold(why: str) -> str:
    """`share:1` and the like, in words."""
    kind, _, window = why.partition(":")
    named = f"window {window}" if window else ""
    return {"share": f"rotator's share of {named} is used", "reserve": f"{named} is down to its reserve",
            "rate": "the configured requests_per_second", "429": "the key service answered 429"}.get(
        kind, why or "paused")


def _clock(when: float) -> str:
    if not 0 <= when < 253_402_300_800:  # year 10000: beyond what a date can say
        return "a time beyond any date"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(PermanentError):
    """The configuration cannot be used; `problems` lists every reason found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class ConfigProblem:
    """One problem in a configuration file: where it is and why it is wrong."""

    __slots__ = ("file", "key", "reason")

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        """`file: key: reason`; a problem of the whole file (key "-") is `file: reason`."""
        return f"{self.file}: {self.reason}" if self.key == "-" else f"{self.file}: {self.key}: {self.reason}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self.file!r}, {self.key!r}, {self.reason!r})"


class AuthenticationError(PermanentError):
    """A credential was refused (401/403)."""


class ForbiddenError(PermanentError):
    """The credential is valid but may not do this (403)."""


class NotFoundError(PermanentError):
    """The thing asked for does not exist (or no longer exists)."""


class ConflictError(PermanentError):
    """The request conflicts with the current state (409, a revoke of the auto-generated key)."""


class IdempotencyConflictError(ConflictError):
    """`409 idempotent_creation_conflict`: the write's Idempotency-Key was used before (within
    24 h), so the call was blocked; what the first call answered is read through the responses
    endpoint."""


class ProtocolError(PermanentError):
    """A peer answered with something that is not what its contract promises."""


class StaleWriteError(PermanentError):
    """A sink already holds a newer rotation than the one being written."""


class OtherKeyError(PermanentError):
    """A sink's place holds the document of another key than the one read or written."""


class WriteConflictError(TransientError):
    """Someone wrote between our read and our write (check-and-set); read again and retry."""
