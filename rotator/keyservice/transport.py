"""The key service's transport: one HTTP call with its retries, deadlines and caps, and the judging
of what came back into the project's error tree (refused, in doubt, transient, permanent).

Every transport or status error is mapped here, in one place. Messages carry the method and path;
never a token, a secret or a response body (a reset's body holds the secret), and at most a short,
escaped excerpt of any value the service sent. Every call has an overall deadline (connect,
headers and the whole body) and every answer is size-capped after decompression. The API on top
(docs/keyservice-api.md) is `rotator.keyservice.http`; AWS IAM's adapter judges its writes with
the same `judged`.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import httpcore
import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

from rotator.errors import (
    AuthenticationError,
    BudgetSpent,
    BusyError,
    ConflictError,
    ForbiddenError,
    IdempotencyConflictError,
    InDoubtError,
    NotFoundError,
    PermanentError,
    ProtocolError,
    RefusedError,
    RotatorError,
    ServerError,
    ThrottledError,
    TransientError,
    UnansweredError,
)
from rotator.safety import ID_RE, excerpt

_CODINGS = frozenset({"", "identity", "gzip", "deflate"})
MAX_BODY_BYTES: Final = 1 << 20  # one answer (one page), after decompression
MAX_ERROR_BODY_BYTES: Final = 64 << 10  # an error answer: only its Type and Message are read
MAX_MESSAGE_EXCERPT: Final = 80
#: The error Types of the idempotency store (docs/keyservice-api.md, "Idempotency").
KEY_USED: Final = "idempotent_creation_conflict"  # a POST with a used Idempotency-Key: blocked
NOTHING_STORED: Final = "correlationid_not_found"  # the responses endpoint: no answer under that key


def judged(status: int | None, message: str, *, refused: str = "", in_doubt: str) -> RotatorError:
    """A write that did not succeed, judged by what is proved: a 4xx means it did not run
    (`RefusedError`, `refused` appended); anything else (no answer, a 5xx, a redirect, a cut or
    oversized answer) leaves it in doubt (`InDoubtError`, `in_doubt` appended)."""
    if status is not None and 400 <= status < 500:
        return RefusedError(f"{message}; {refused}" if refused else message, status=status)
    return InDoubtError(f"{message}; {in_doubt}")


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


# --- the overall deadline of one call ---------------------------------------------------------------
# httpx's time-outs bound each socket operation, so a body trickled one byte at a time never times
# out. The network backend below bounds every connect, read and write by what is left of the
# calling thread's deadline instead (sync httpx does all I/O of a call in the calling thread).

_DEADLINE = threading.local()


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    deadline: float | None = getattr(_DEADLINE, "at", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0.001:
        raise error("the call's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (its request and error mapping) over the deadline-bound backend."""

    def __init__(self) -> None:
        tls = httpx.create_ssl_context()  # loading the CA bundle is the costly part: once, not twice
        super().__init__(verify=tls)
        self._pool = httpcore.ConnectionPool(
            ssl_context=tls, max_connections=20, max_keepalive_connections=10,
            keepalive_expiry=5.0, network_backend=_DeadlineBackend(),
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer, read within the deadline and the size cap."""

    status: int
    headers: httpx.Headers
    body: bytes
    truncated: bool = False  # an error answer larger than its cap: only its status is used


class Transport:
    """One base URL and token: `request` makes a call with its retries within the call's deadline.

    `timeout_s` is the deadline of one try (connect, headers and the whole body); a call makes at
    most `max_attempts` tries."""

    def __init__(
        self, base_url: str, token: str, *, timeout_s: float, max_attempts: int, retry_max_wait_s: float,
        retry_initial_s: float, transport: httpx.BaseTransport | None, max_body_bytes: int, call_deadline_s: float,
    ) -> None:
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport or _DeadlineTransport(),
            headers={"Accept": "application/json", "Accept-Encoding": "gzip, deflate", "User-Agent": "rotator"},
        )
        self.auth: httpx.Auth = _Bearer(token)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._call_deadline_s = call_deadline_s  # every try and every wait of one call, together
        self._max_wait = retry_max_wait_s
        self._initial_wait = retry_initial_s
        self.max_body_bytes = max_body_bytes
        #: Called with the path and every whole answer, an error's too (rate limits).
        self.on_answer: Callable[[str, Answer], None] | None = None

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200,),
                 auth: httpx.Auth | None = None, shown: str | None = None,
                 gate: Callable[[float], None] | None = None, **kwargs: Any) -> Answer:
        """One call with its retries; `shown` names the path in messages instead of `path`.
        `gate` is asked before every try, with the call's deadline (monotonic): it waits for the
        rate budget or raises `BudgetSpent`, which ends the call (in doubt if a try went out)."""
        deadline = time.monotonic() + self._call_deadline_s
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self._max_attempts) | stop_after_delay(self._call_deadline_s),
            wait=partial(self.wait, gated=gate is not None),
            reraise=True,
        )
        in_doubt = False  # once a write's try proved nothing (no answer, a 5xx), the call may have run
        tries = 0
        try:
            for attempt in retrying:
                with attempt:
                    if gate is not None:
                        gate(deadline)
                    tries += 1
                    try:
                        return self.send(method, path, expect, auth or self.auth, kwargs, shown)
                    except (UnansweredError, ServerError, BusyError):
                        # A read or a token request changes nothing: its last answer is what counts.
                        in_doubt = method != "GET" and not path.endswith("/oauth/token")
                        raise
        except BudgetSpent as exc:
            if in_doubt:
                raise InDoubtError(f"{exc} (after {tries} attempts; outcome unknown)") from None
            raise
        except RotatorError as exc:
            if isinstance(exc, IdempotencyConflictError):  # the key was used: the caller reads its answer
                raise
            if in_doubt:
                raise InDoubtError(f"{exc} (after {tries} attempts; outcome unknown)") from None
            if isinstance(exc, TransientError):
                again = type(exc)(f"{exc} (gave up after {tries} attempts)", retry_after=exc.retry_after)
                again.status, again.kind = exc.status, exc.kind
                raise again from None
            raise
        raise AssertionError("unreachable")

    def send(self, method: str, path: str, expect: tuple[int, ...], auth: httpx.Auth,
              kwargs: dict[str, Any], shown: str | None = None) -> Answer:
        """One try, within the deadline: connect, send, read the headers and the capped body."""
        where = f"{method} {shown or path}"
        deadline = time.monotonic() + self._timeout_s
        _DEADLINE.at = deadline
        try:
            request = self.client.build_request(method, path, **kwargs)
            response = self.client.send(request, auth=auth, stream=True)
            try:
                codings = [c.strip().lower() for c in response.headers.get("Content-Encoding", "").split(",")]
                if len([c for c in codings if c not in ("", "identity")]) > 1 or not set(codings) <= _CODINGS:
                    # Each layer multiplies what one network read expands to before the cap sees it.
                    raise ProtocolError(f"{where}: the answer's Content-Encoding is not one of gzip or deflate")
                wanted = response.status_code in expect
                limit = self.max_body_bytes if wanted else MAX_ERROR_BODY_BYTES
                body, truncated = _read_capped(response, limit, deadline)
            finally:
                response.close()
        except httpx.TimeoutException:
            raise UnansweredError(f"{where}: no answer within {self._timeout_s:g}s") from None
        except httpx.TransportError as exc:
            raise UnansweredError(f"{where}: connection failed ({type(exc).__name__})") from None
        except httpx.DecodingError:
            raise ProtocolError(f"{where}: the answer's Content-Encoding does not decode") from None
        finally:
            _DEADLINE.at = None
        if time.monotonic() > deadline:
            raise UnansweredError(f"{where}: no whole answer within {self._timeout_s:g}s")
        answer = Answer(response.status_code, response.headers, body, truncated)
        if self.on_answer is not None:
            self.on_answer(path, answer)
        if wanted:
            if truncated:
                raise ProtocolError(f"{where}: the answer is larger than {self.max_body_bytes} bytes")
            return answer
        # The Idempotency-Key reads the live secret: a gateway that echoes the header never gets it quoted.
        raise status_error(where, answer, hidden=(kwargs.get("headers") or {}).get("Idempotency-Key", ""))

    def wait(self, state: RetryCallState, gated: bool = False) -> float:
        """Before the next try: a 429's `Retry-After` (capped), else backoff with jitter; with a
        rate budget (`gated`), none after a 429: the budget's gate waits it out or defers."""
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        # Never wait past the call's deadline.
        left = max(0.0, self._call_deadline_s - (state.seconds_since_start or 0.0))
        if isinstance(exc, ThrottledError) and gated:
            return 0.0
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return min(exc.retry_after, self._max_wait, left)
        backoff = self._initial_wait * 2 ** (state.attempt_number - 1)
        return float(min(self._max_wait, backoff, left) * random.uniform(0.5, 1.0))


def _read_capped(response: httpx.Response, limit: int, deadline: float) -> tuple[bytes, bool]:
    """The decompressed body, read until `limit` bytes or the deadline; (body, truncated)."""
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            return b"", True
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the call's deadline has passed")
    return b"".join(chunks), False


def status_error(where: str, answer: Answer, hidden: str = "") -> Exception:
    """The error for an answer that is not the one expected; `hidden` (the call's Idempotency-Key)
    is never quoted from it."""
    status = answer.status
    kind, message = "", ""
    if not answer.truncated:
        try:
            body = json.loads(answer.body)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict):
            raw_kind, raw_message = (_without(body.get(name), hidden) for name in ("Type", "Message"))
            if isinstance(raw_kind, str) and raw_kind:
                kind = raw_kind if ID_RE.fullmatch(raw_kind) and len(raw_kind) <= 40 else excerpt(raw_kind)
            if isinstance(raw_message, str) and raw_message:
                message = _message(raw_message)
    text = f"{where}: {status}" + (f" {kind}" if kind else "") + (f": {message}" if message else "")
    transient: TransientError | None = None
    if (status, kind) == (409, KEY_USED):
        used = IdempotencyConflictError(text)
        used.status, used.kind = status, kind
        return used
    if status >= 500:
        transient = ServerError(text, retry_after=retry_after(answer))
    elif status == 429:
        transient = ThrottledError(text, retry_after=retry_after(answer))
    elif status == 409 and answer.headers.get("Retry-After") is not None:
        transient = BusyError(text, retry_after=retry_after(answer))
    if transient is not None:
        transient.status, transient.kind = status, kind
        return transient
    # "Gone" only on the service's own word: a proxy's 404 (no such Type) must not end an attempt.
    gone = NotFoundError if kind == "ressource_not_found" else PermanentError
    error = {401: AuthenticationError, 403: ForbiddenError, 404: gone,
             409: ConflictError}.get(status, PermanentError)(text)
    error.status, error.kind = status, kind
    return error


def _without(value: object, hidden: str) -> object:
    """`value` with every copy of `hidden` (in any case) replaced by `{IdempotencyKey}`."""
    if not hidden or not isinstance(value, str):
        return value
    return re.sub(re.escape(hidden), "{IdempotencyKey}", value, flags=re.IGNORECASE)


def _message(text: str) -> str:
    """An error Message as plain text if it is short and clean, else an escaped excerpt."""
    if len(text) <= MAX_MESSAGE_EXCERPT and text.isprintable():
        return text
    return excerpt(text, MAX_MESSAGE_EXCERPT)


def retry_after(answer: Answer) -> float | None:
    """An answer's `Retry-After` in seconds (digits only, at most six), else None."""
    value = answer.headers.get("Retry-After", "")
    if value.isascii() and value.isdigit() and len(value) <= 6:
        return float(value)
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(answer: Answer, where: str) -> Any:
    try:
        return json.loads(answer.body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        kind = answer.headers.get("Content-Type", "no content type")
        raise ProtocolError(
            f"{where}: answer is not valid JSON (status {answer.status}, {excerpt(kind)}, "
            f"{len(answer.body)} bytes)"
        ) from None
