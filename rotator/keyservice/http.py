"""The adapter for docs/keyservice-api.md (docs/keyservice-openapi.yaml): the key-service API over
`rotator.keyservice.transport` (one call, its retries and deadlines, and the judging of its answer).

The key service is not trusted: every id it sends is checked against one strict rule (ids are
data, never paths), every URL path segment is percent-encoded, listings are capped in pages and
refused when a page repeats, and dates must be sane Unix seconds; the transport bounds every call
by a deadline and every answer by a size cap.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

import httpx

from rotator.budget import FINISH, PREPAID, READ, WRITE, RateBudget, Seen
from rotator.config import KeyServiceConfig, read_credential
from rotator.domain import ApiKey, ClientInfo, Environment, IssuedKey, Replay, ReplayAnswer, Scope, Secret
from rotator.errors import (
    AuthenticationError,
    BudgetSpent,
    IdempotencyConflictError,
    InDoubtError,
    NotFoundError,
    PermanentError,
    ProtocolError,
    RefusedError,
    RotatorError,
    ThrottledError,
    UnusableAnswerError,
)
from rotator.keyservice.transport import (
    KEY_USED,
    MAX_BODY_BYTES,
    NOTHING_STORED,
    Answer,
    Transport,
    decode,
    judged,
    retry_after,
)
from rotator.safety import ID_RE, ID_RULE, MAX_ALIAS_LEN, UNSAFE_TEXT_RE, excerpt, text_problem

API = "/v2.01"
MAX_SECRET_LEN = 4096
MAX_PAGES: Final = 10_000
MAX_COUNT_DIGITS: Final = 18
MIN_DATE: Final = 946_684_800  # 2000-01-01T00:00:00Z
DEFAULT_CLOCK_SKEW_S: Final = 86_400
MAX_STATUS_LEN: Final = 64
MAX_REQUEST_URL_LEN: Final = 2048

#: Judges a write's 200 body (`body`, `where`, latest date): the usable answer, or ProtocolError.
_Judge = Callable[[Any, str, float], IssuedKey]


class HttpKeyService:
    """Speaks docs/keyservice-api.md. Retries transient failures; a reset retry reuses its key.

    `timeout_s` is the deadline of one try (connect, headers and the whole body); a call makes at
    most `max_attempts` tries."""

    def __init__(
        self, base_url: str, token: str, *, timeout_s: float = 10.0, max_attempts: int = 5,
        retry_max_wait_s: float = 30.0, retry_initial_s: float = 0.25, per_page: int = 100,
        transport: httpx.BaseTransport | None = None, max_body_bytes: int = MAX_BODY_BYTES,
        max_pages: int = MAX_PAGES, clock_skew_s: float = DEFAULT_CLOCK_SKEW_S, call_deadline_s: float = 120.0,
        budget: RateBudget | None = None,
    ) -> None:
        self._transport = Transport(
            base_url, token, timeout_s=timeout_s, max_attempts=max_attempts, retry_max_wait_s=retry_max_wait_s,
            retry_initial_s=retry_initial_s, transport=transport, max_body_bytes=max_body_bytes,
            call_deadline_s=call_deadline_s)
        self._client = self._transport.client
        self.per_page = per_page
        self.max_pages = max_pages
        self.clock_skew_s = clock_skew_s
        #: The last rate-limit windows each Client ID's answers carried (docs/keyservice-api.md).
        self.rate_limits: dict[str, tuple[RateWindow, ...]] = {}
        #: The fleet's rate budget (rotator.budget): every call of a Client ID spends from it.
        self.budget = budget
        #: Per Client ID, the windows the last answer showed and when it came (monotonic): told
        #: with the next call, each reset less the time since (a minute on, no longer told).
        self._unreported: dict[str, tuple[tuple[Seen, ...], float]] = {}
        self._calling = threading.local()  # the Client ID of the call in hand (a token call names none)
        self._transport.on_answer = self._saw_answer

    @classmethod
    def from_config(cls, config: KeyServiceConfig, *, url: str, token: str) -> HttpKeyService:
        return cls(url, token, timeout_s=config.timeout_s, max_attempts=config.max_attempts,
                   retry_max_wait_s=config.retry_max_wait_s, per_page=config.per_page,
                   clock_skew_s=config.clock_skew_s, call_deadline_s=config.call_deadline_s)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> HttpKeyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the KeyService protocol ---------------------------------------------------------
    def list_clients(self) -> Iterator[ClientInfo]:
        path = f"{API}/clients"
        where = f"GET {path}"
        seen: set[str] = set()
        for row in self._pages(path):
            if not isinstance(row, dict):
                raise ProtocolError(f"{where}: a client must be a JSON object")
            name = row.get("Name")
            problem = text_problem(name)
            if problem is not None:
                raise ProtocolError(f"{where}: field 'Name' {problem}")
            client = ClientInfo(_id(row, "ClientId", where, echo=True), str(name), _env(row, where))
            if client.client_id in seen:
                raise ProtocolError(f"{where}: the listing names Client ID {excerpt(client.client_id)} twice")
            seen.add(client.client_id)
            yield client

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        path = _path("GET", "{ClientId}/apikeys", ("client id", client_id), "apikeys")
        where = f"GET {path}"
        seen: set[str] = set()  # a listing that repeats a key (in any order) would fan out endlessly
        latest = self._latest()
        for row in self._pages(path):
            key = parse_key(row, where, latest=latest)
            if key.client_id != client_id:
                raise ProtocolError(f"{where}: a listed key names another Client ID "
                                    f"({excerpt(key.client_id)})")
            if key.key_id in seen:
                raise ProtocolError(f"{where}: the listing names key {excerpt(key.key_id)} twice")
            seen.add(key.key_id)
            yield key

    def get_key(self, client_id: str, key_id: str) -> ApiKey:
        path = _path("GET", "{ClientId}/apikeys/{KeyId}", ("client id", client_id), "apikeys", ("key id", key_id))
        where = f"GET {path}"
        key = parse_key(self._json("GET", path), where, latest=self._latest())
        if (key.client_id, key.key_id) != (client_id, key_id):
            raise ProtocolError(f"{where}: the answer names another key than the one asked for")
        return key

    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        """Reset once. Raises `RefusedError` only when the service proved it did not run (a 4xx)
        or nothing was sent; anything else that is not a usable answer for this key is `InDoubtError`.
        A `409 idempotent_creation_conflict` (the key was used before) is answered by the stored
        answer of that first call, read once."""
        try:
            path = _path("POST", "{ClientId}/apikeys/{KeyId}/reset", ("client id", client_id), "apikeys",
                         ("key id", key_id), "reset")
            _checked_id(idempotency_key, "Idempotency-Key", f"POST {path}")
        except ProtocolError as exc:
            raise RefusedError(f"{exc}; nothing was sent", status=None) from None
        return self._write_once(path, _reset_judge(client_id, key_id), client_id, idempotency_key)

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        """The stored answer of the reset sent with `idempotency_key`, judged for this key and path."""
        try:
            wanted = _path("POST", "{ClientId}/apikeys/{KeyId}/reset", ("client id", client_id), "apikeys",
                           ("key id", key_id), "reset")
        except ProtocolError as exc:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"replay not sent: {exc}")
        return self._replay(client_id, wanted, idempotency_key, _reset_judge(client_id, key_id))

    def create_key(
        self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str,
        replaces: str | None = None,
    ) -> IssuedKey:
        """Create once (with `replaces`, that key's successor), classified like `reset_key`: the answer
        must name a key of this client with this alias that `Replaces` exactly `replaces`."""
        try:
            path = _path("POST", "{ClientId}/apikeys", ("client id", client_id), "apikeys")
            where = f"POST {path}"
            problem = text_problem(alias)
            if problem is not None:
                raise ProtocolError(f"{where}: the alias {problem}")
            _checked_id(idempotency_key, "Idempotency-Key", where)
            if replaces is not None:
                _checked_id(replaces, "Replaces", where)
        except ProtocolError as exc:
            raise RefusedError(f"{exc}; nothing was sent", status=None) from None
        payload: dict[str, Any] = {"Alias": alias, "Scopes": [
            {"Scope": s.name, "Read": s.read, "Write": s.write} for s in scopes]}
        if replaces is not None:
            payload["Replaces"] = replaces
        return self._write_once(path, _create_judge(client_id, alias, replaces), client_id, idempotency_key,
                                json=payload)

    def replay_create(self, client_id: str, replaces: str | None, idempotency_key: str) -> ReplayAnswer:
        """The stored answer of the create of `replaces`' successor sent with `idempotency_key`: the
        answer only when it names a key of this client that `Replaces` it (None: a create without
        `Replaces`, the alias-template mode's, whose key the caller links)."""
        try:
            wanted = _path("POST", "{ClientId}/apikeys", ("client id", client_id), "apikeys")
            if replaces is not None:
                _checked_id(replaces, "Replaces", f"POST {wanted}")
        except ProtocolError as exc:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"replay not sent: {exc}")
        return self._replay(client_id, wanted, idempotency_key, _create_judge(client_id, None, replaces))

    def revoke_key(self, client_id: str, key_id: str) -> None:
        path = _path("DELETE", "{ClientId}/apikeys/{KeyId}", ("client id", client_id), "apikeys", ("key id", key_id))
        self._request("DELETE", path, expect=(204,))

    def read_sandbox_secret(self, client_id: str, key_id: str) -> Secret:
        path = _path("GET", "{ClientId}/apikeys/{KeyId}/secret", ("client id", client_id), "apikeys",
                     ("key id", key_id), "secret")
        where = f"GET {path}"
        body = self._json("GET", path)
        if not isinstance(body, dict):
            raise ProtocolError(f"{where}: the answer must be a JSON object")
        return _secret(body, where)

    def verify_secret(self, client_id: str, secret: Secret, key_id: str | None = None) -> bool:
        """The token check needs only the secret: `key_id` is accepted for the protocol and unused."""
        _checked_id(client_id, "client id", f"POST {API}/oauth/token")
        try:
            self._request(
                "POST", f"{API}/oauth/token", data={"grant_type": "client_credentials"},
                auth=httpx.BasicAuth(client_id, secret.reveal()), client=client_id, kind=PREPAID,
            )
        except AuthenticationError:
            return False
        return True

    # --- transport ---------------------------------------------------------------------------
    def _latest(self) -> float:
        """The latest date an answer may carry: now plus the allowed clock skew."""
        return time.time() + self.clock_skew_s

    def _pages(self, path: str) -> Iterator[Any]:
        """Yield rows page by page; at most two pages are held (to refuse a repeated page)."""
        where = f"GET {path}"
        page, previous = 1, None
        while True:
            if page > self.max_pages:
                raise ProtocolError(f"{where}: more than {self.max_pages} pages; refusing to go on")
            answer = self._request("GET", path, params={"page": page, "per_page": self.per_page})
            rows = decode(answer, where)
            if not isinstance(rows, list):
                raise ProtocolError(f"{where}: expected a JSON array")
            if len(rows) > self.per_page:
                raise ProtocolError(f"{where}: page {page} has {len(rows)} rows, more than per_page={self.per_page}")
            if rows and rows == previous:
                raise ProtocolError(f"{where}: page {page} repeats page {page - 1} (a listing that never ends)")
            pages = parse_count(answer.headers.get("X-Number-Of-Pages"), "X-Number-Of-Pages", where)
            if pages is not None and pages > self.max_pages:
                raise ProtocolError(f"{where}: X-Number-Of-Pages is {pages}, more than the cap of {self.max_pages}")
            yield from rows
            if not rows or (pages is not None and page >= pages):
                return
            previous = rows
            page += 1

    def _request(self, method: str, path: str, *, kind: str | None = None, client: str | None = None,
                 **kwargs: Any) -> Answer:
        """One call, spent from the rate budget of its Client ID (`client`, else the one its path
        names): `kind` as `rotator.budget` counts it (a GET or DELETE reads, a POST writes)."""
        if client is None:
            named = _CLIENT_PATH.match(path)
            client = named.group(1) if named is not None else None
        self._calling.client = client
        gate = None
        if self.budget is not None and client is not None:
            gate = partial(self._gate, client, kind or (READ if method in ("GET", "DELETE") else WRITE))
        return self._transport.request(method, path, gate=gate, **kwargs)

    def _gate(self, client: str, kind: str, deadline: float) -> None:
        assert self.budget is not None
        seen, at = self._unreported.pop(client, ((), 0.0))
        since = time.monotonic() - at
        told = tuple((made, left, reset_in - since) for made, left, reset_in in seen) if since < STALE_ANSWER_S else ()
        self.budget.wait_or_defer(client, kind, told, deadline)

    def _saw_answer(self, path: str, answer: Answer) -> None:
        """Every answer's rate-limit windows (a 429's and a 5xx's too), kept per Client ID (an
        answer without them forgets the last ones rather than keep them for ever) and told to the
        fleet's budget with the next call, each reset as seconds from the answer's own `Date`
        (the key service's clock, so no host's clock skews it); a 429 pauses the fleet at once,
        for its Retry-After (else until the windows it shows spent reset, else a minute)."""
        client = getattr(self._calling, "client", None)
        if client is None:
            return
        windows = rate_windows(answer.headers)
        if windows:
            self.rate_limits[client] = windows
        else:
            self.rate_limits.pop(client, None)
        if self.budget is None:
            return
        said = _service_time(answer.headers.get("Date"))
        # A window is at most a day long: a reset further off (or past) is no window's.
        seen = tuple((w.made, w.left, float(w.resets_at) - said) for w in windows
                     if 0 < float(w.resets_at) - said <= MAX_RESET_IN_S)
        if answer.status != 429:
            self._unreported[client] = (seen, time.monotonic())
            return
        self._unreported.pop(client, None)
        wait = retry_after(answer)
        spent = [reset_in for (_, left, reset_in) in seen if left == 0 and reset_in > 0]
        self.budget.observe(client, seen, pause_s=wait if wait is not None else (max(spent) if spent else 60.0),
                            pause_why="429")

    def _json(self, method: str, path: str, shown: str | None = None, **kwargs: Any) -> Any:
        return decode(self._request(method, path, shown=shown, **kwargs), f"{method} {shown or path}")

    def _write_once(self, path: str, judge: _Judge, client_id: str, idempotency_key: str,
                    **kwargs: Any) -> IssuedKey:
        """One idempotent POST: a 4xx is a refusal, anything but a 200 that `judge` accepts is in doubt.
        A 409 saying the Idempotency-Key was used is neither: the first call's stored answer decides."""
        method = "POST"
        where = f"{method} {path}"
        try:
            answer = self._request(method, path, headers={"Idempotency-Key": idempotency_key}, **kwargs)
        except IdempotencyConflictError:
            return _after_conflict(where, self._replay(client_id, path, idempotency_key, judge))
        except InDoubtError:
            raise
        except (PermanentError, ThrottledError) as exc:  # a 4xx did not run; a 3xx, a cut or oversized answer may have
            raise judged(exc.status, str(exc), in_doubt="the call may have run") from None
        except RotatorError as exc:
            raise InDoubtError(str(exc)) from None
        try:
            return judge(decode(answer, where), where, self._latest())
        except ProtocolError as exc:  # a 200 that is no usable answer: it ran, the answer is not in hand
            raise UnusableAnswerError(f"{exc}; the call may have run") from None

    def _replay(self, client_id: str, wanted: str, idempotency_key: str, judge: _Judge) -> ReplayAnswer:
        """Read the stored answer under `idempotency_key`; only a stored 200 of the `wanted` path that
        `judge` accepts is the answer. Never raises."""
        try:
            path = _path("GET", "{ClientId}/responses/{IdempotencyKey}", ("client id", client_id), "responses",
                         ("Idempotency-Key", idempotency_key))
        except ProtocolError as exc:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"replay not sent: {exc}")
        # The Idempotency-Key reads the live secret from the stored answer: no message names it.
        shown = path.rsplit("/", 1)[0] + "/{IdempotencyKey}"
        where = f"GET {shown}"
        try:
            stored = self._json("GET", path, shown=shown, client=client_id, kind=FINISH)
        except BudgetSpent as exc:  # only a 429's pause holds back a replay
            return ReplayAnswer(Replay.UNKNOWN, reason=f"replay not sent: {exc}")
        except NotFoundError:  # a 404: nothing stored
            return ReplayAnswer(Replay.EMPTY)
        except RotatorError as exc:
            if (exc.status, exc.kind) == (400, NOTHING_STORED):  # the published "nothing stored"
                return ReplayAnswer(Replay.EMPTY)
            # Status and Type only: a gateway's Message might echo the URL, and with it the key.
            said = str(exc) if exc.status is None else f"{exc.status} {exc.kind}".rstrip()
            return ReplayAnswer(Replay.UNKNOWN, reason=f"replay of the stored answer failed: {said}")
        status = stored_status(stored.get("StatusCode") if isinstance(stored, dict) else None)
        if status is None:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"{where}: answer has no StatusCode of three digits")
        if not same_request(stored.get("RequestURL"), wanted):
            return ReplayAnswer(Replay.UNKNOWN, reason=f"{where}: the stored answer is for another request")
        if 400 <= status < 500:  # a stored answer is final (a 409 asking to retry is never stored)
            return ReplayAnswer(Replay.REFUSED, reason=f"the stored call had failed with {status}")
        if status >= 500:  # the key is used up; what the call did is not in its answer
            return ReplayAnswer(Replay.SPENT, reason=f"the stored call had failed with {status}")
        if status != 200:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"{where}: the stored call answered {status}")
        try:
            return ReplayAnswer(Replay.ANSWER, judge(stored.get("Resource"), where, self._latest()))
        except ProtocolError as exc:
            return ReplayAnswer(Replay.UNKNOWN, reason=str(exc))





@dataclass(frozen=True, slots=True)
class RateWindow:
    """One window of the key service's rate limit, as an answer's headers give it."""

    made: int  # calls the Client ID made in it
    left: int  # calls it has left
    resets_at: int  # Unix time at which it starts again


#: The longest a published window lasts (a day), with room: a reset further off is no window's.
MAX_RESET_IN_S: Final = 86_400 + 3_600
#: An answer's windows told this late would be stale: dropped (the next answer tells them again).
STALE_ANSWER_S: Final = 60.0
_CLIENT_PATH = re.compile(r"^/v2\.01/(?!oauth/|clients$)([^/]+)/")
MAX_RATE_WINDOWS: Final = 8


def _service_time(value: str | None) -> float:
    """The key service's clock, from its answer's `Date`; this host's when it sends none, or one
    more than a day from this host's (a broken or hostile header, not a clock)."""
    here = time.time()
    if value:
        try:
            said = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return here
        if abs(said - here) <= 86_400:
            return said
    return here


def rate_windows(headers: httpx.Headers) -> tuple[RateWindow, ...]:
    """`X-RateLimit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` read together, window by
    window in the published order: as many windows as all three give (fewer or more than the
    published four), up to the first value that is not a count; () without them. Never raises."""
    reset = headers.get("X-RateLimit-Reset")
    if reset is None:  # a service that publishes no rate limit: one lookup per answer, not three
        return ()
    columns = [(headers.get("X-RateLimit") or "").split(","),
               (headers.get("X-RateLimit-Remaining") or "").split(","), reset.split(",")]
    windows: list[RateWindow] = []
    for made, left, reset in list(zip(*columns, strict=False))[:MAX_RATE_WINDOWS]:
        values = [value.strip() for value in (made, left, reset)]
        if not all(v.isascii() and v.isdigit() and len(v) <= MAX_COUNT_DIGITS for v in values):
            break
        windows.append(RateWindow(*(int(v) for v in values)))
    return tuple(windows)


def _path(method: str, template: str, *segments: str | tuple[str, str]) -> str:
    """`/v2.01/<segments…>`: each `(field, value)` segment checked by the id rule, every segment
    percent-encoded. `template` names the call in an error about a bad id (the id is not echoed
    in a path, only as an escaped excerpt)."""
    where = f"{method} {API}/{template}"
    parts = []
    for segment in segments:
        if isinstance(segment, tuple):
            field, value = segment
            parts.append(_checked_id(value, field, where))
        else:
            parts.append(segment)
    return API + "".join("/" + quote(part, safe="") for part in parts)


def _checked_id(value: object, field: str, where: str) -> str:
    if type(value) is not str or ID_RE.fullmatch(value) is None:
        raise ProtocolError(f"{where}: {field} {excerpt(value)} is not an id ({ID_RULE})")
    return value


def parse_count(value: str | None, name: str, where: str) -> int | None:
    """A count header (`X-Number-Of-Pages`): ASCII digits only, at most 18 of them."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_COUNT_DIGITS:
        raise ProtocolError(f"{where}: header {name} is {excerpt(value)}, not a count")
    return int(value)


def _after_conflict(where: str, found: ReplayAnswer) -> IssuedKey:
    """A write blocked by `409 idempotent_creation_conflict`: its key was used, so the stored answer of
    that first call is the outcome. Read once, never a second POST."""
    if found.kind is Replay.ANSWER and found.issued is not None:
        return found.issued
    if found.kind is Replay.REFUSED:
        raise RefusedError(f"{where}: 409 {KEY_USED}; {found.reason}", status=409, stored=True)
    why = {Replay.EMPTY: "nothing is stored under it yet (a call with it may still be running)",
           Replay.SPENT: f"its first call answered no secret ({found.reason})"}.get(found.kind, found.reason)
    raise InDoubtError(f"{where}: 409 {KEY_USED}: the Idempotency-Key was used and {why}")


def stored_status(value: object) -> int | None:
    """The API Response object's `StatusCode`: a string of three digits as published (`"200"`), or
    an integer; None for anything else."""
    if type(value) is int:
        number = value
    elif type(value) is str and len(value) == 3 and value.isascii() and value.isdigit():
        number = int(value)
    else:
        return None
    return number if 100 <= number <= 599 else None


def same_request(url: object, wanted: str) -> bool:
    """Whether a stored answer's `RequestURL` names the `wanted` path. Published as the full URL the
    service's gateway saw: any scheme-and-host (gateways rewrite hosts) and any prefix before the
    version segment are accepted, the version segment is compared without case, every segment after
    percent-decoding, repeated slashes and a query ignored; no version segment may stand before it.
    Absent (null) is accepted: the judge still checks the stored body names the asked key."""
    if url is None:
        return True
    if type(url) is not str or not url or len(url) > MAX_REQUEST_URL_LEN or not url.isprintable():
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in ("", "http", "https"):
        return False
    have = [unquote(s) for s in parts.path.split("/") if s]
    want = [unquote(s) for s in wanted.split("/") if s]
    version = want[0].lower()
    start = len(have) - len(want)
    if start < 0 or have[start].lower() != version or have[start + 1:] != want[1:]:
        return False
    return all(segment.lower() != version for segment in have[:start])  # no other call's path nested before


_ENVIRONMENTS = {e.value: e for e in Environment}
_SCOPE_CACHE: list[tuple[list[Any], tuple[Scope, ...]]] = []  # most recently used first


def parse_key(row: Any, where: str, *, latest: float | None = None, echo: bool = True) -> ApiKey:
    """A key object of the contract, checked field by field: ids by the id rule, the alias as
    free text, dates as Unix seconds between 2000-01-01 and `latest` (default: now plus a day).

    This runs once per key in every scan, so the common case is one combined check; only a key
    that fails it goes through the slow path that names the bad field. With `echo=False` (an
    answer that carries a secret) no message quotes any value of the answer.
    """
    if latest is None:
        latest = time.time() + DEFAULT_CLOCK_SKEW_S
    if isinstance(row, dict):
        client_id, key_id, alias = row.get("ClientId"), row.get("Id"), row.get("Alias")
        created, last = row.get("CreationDate"), row.get("LastResetDate")
        status = row.get("Status", "ACTIVE")
        env = row.get("Environment")
        environment = _ENVIRONMENTS.get(env) if type(env) is str else None
        replaces, replaced_by = row.get("Replaces"), row.get("ReplacedBy")
        if (type(client_id) is str and type(key_id) is str and type(alias) is str
                and type(created) is int and (last is None or type(last) is int)
                and environment is not None and type(status) is str
                and ID_RE.fullmatch(client_id) is not None and ID_RE.fullmatch(key_id) is not None
                and len(alias) <= MAX_ALIAS_LEN and UNSAFE_TEXT_RE.search(alias) is None
                and MIN_DATE <= created <= latest and (last is None or created <= last <= latest)
                and len(status) <= MAX_STATUS_LEN and UNSAFE_TEXT_RE.search(status) is None
                and (replaces is None or (type(replaces) is str and replaces != key_id
                                          and ID_RE.fullmatch(replaces) is not None))
                and (replaced_by is None or (type(replaced_by) is str and replaced_by not in (key_id, replaces)
                                             and ID_RE.fullmatch(replaced_by) is not None))):
            return ApiKey(client_id, key_id, alias, environment, _scopes(row.get("Scopes"), where),
                          created, last, row.get("IsAutoGenerated") is True, status,
                          replaces=replaces, replaced_by=replaced_by)
    return _parse_key_slowly(row, where, latest, echo)


def _scopes(raw: Any, where: str) -> tuple[Scope, ...]:
    """Scopes repeat across keys: each distinct list is parsed once (small MRU cache; list
    equality runs in C, so a hit costs about a microsecond)."""
    if not isinstance(raw, list):
        raise ProtocolError(f"{where}: key field 'Scopes' must be a list")
    for index, (seen, parsed) in enumerate(_SCOPE_CACHE):
        if seen == raw:
            if index:
                _SCOPE_CACHE.insert(0, _SCOPE_CACHE.pop(index))
            return parsed
    scopes = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        name = item.get("Scope")
        problem = text_problem(name)
        if problem is not None:
            raise ProtocolError(f"{where}: a scope's field 'Scope' {problem}")
        scopes.append(Scope(str(name), item.get("Read") is True, item.get("Write") is True))
    parsed = tuple(scopes)
    _SCOPE_CACHE.insert(0, (raw, parsed))
    del _SCOPE_CACHE[32:]
    return parsed


def _parse_key_slowly(row: Any, where: str, latest: float, echo: bool) -> ApiKey:
    if not isinstance(row, dict):
        raise ProtocolError(f"{where}: a key must be a JSON object")
    client_id = _id(row, "ClientId", where, echo)
    key_id = _id(row, "Id", where, echo)
    alias = row.get("Alias")
    problem = text_problem(alias)
    if problem is not None:
        raise ProtocolError(f"{where}: key field 'Alias' {problem}")
    created = _date(row, "CreationDate", where, latest, echo)
    last = row.get("LastResetDate")
    if last is not None:
        last = _date(row, "LastResetDate", where, latest, echo)
        if last < created:
            raise ProtocolError(f"{where}: key field 'LastResetDate' is before its 'CreationDate'")
    status = row.get("Status", "ACTIVE")
    problem = text_problem(status, MAX_STATUS_LEN)
    if problem is not None:
        raise ProtocolError(f"{where}: key field 'Status' {problem}")
    replaces = _link(row, "Replaces", key_id, where, echo)
    replaced_by = _link(row, "ReplacedBy", key_id, where, echo)
    if replaces is not None and replaces == replaced_by:
        raise ProtocolError(f"{where}: key fields 'Replaces' and 'ReplacedBy' name the same key")
    return ApiKey(
        client_id=client_id,
        key_id=key_id,
        alias=str(alias),
        environment=_env(row, where),
        scopes=_scopes(row.get("Scopes"), where),
        created_at=created,
        last_reset_at=last,
        is_auto_generated=row.get("IsAutoGenerated") is True,
        status=str(status),
        replaces=replaces,
        replaced_by=replaced_by,
    )


def _link(row: dict[str, Any], name: str, key_id: str, where: str, echo: bool) -> str | None:
    """`Replaces` or `ReplacedBy`: null (or absent), or the id of another key."""
    if row.get(name) is None:
        return None
    value = _id(row, name, where, echo)
    if value == key_id:
        raise ProtocolError(f"{where}: key field {name!r} names the key itself")
    return value


def _issued(body: Any, where: str, latest: float | None = None) -> IssuedKey:
    """A create, reset or replayed answer: a key with its one-time Secret. No message quotes any
    value of it (any field could hold the secret)."""
    key = parse_key(body, where, latest=latest, echo=False)
    secret = _secret(body, where)
    if _repeats(body, secret.reveal(), skip="Secret"):
        raise ProtocolError(f"{where}: the answer repeats its Secret in another field")
    return IssuedKey(key, secret)


def _repeats(value: Any, secret: str, skip: str = "") -> bool:
    """Whether the secret (or a long part of it) stands anywhere in `value` but the `skip` field:
    such an answer would carry it into aliases, events and logs."""
    probe = secret if len(secret) < 16 else secret[:16]
    if isinstance(value, str):
        return probe in value or (len(value) >= 8 and value in secret)
    if isinstance(value, dict):
        return any(_repeats(v, secret) or _repeats(k, secret) for k, v in value.items() if k != skip)
    if isinstance(value, list):
        return any(_repeats(v, secret) for v in value)
    return False


def _secret(body: dict[str, Any], where: str) -> Secret:
    secret = body.get("Secret")
    if not isinstance(secret, str) or not secret:
        raise ProtocolError(f"{where}: answer has no Secret")
    if len(secret) > MAX_SECRET_LEN or not secret.isprintable() or not _encodable(secret):
        raise ProtocolError(f"{where}: the Secret is not printable UTF-8 text of at most {MAX_SECRET_LEN} characters")
    return Secret(secret)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate; the exception would carry the text, so drop it
        return False
    return True


def _issued_for(body: Any, where: str, client_id: str, key_id: str, latest: float | None = None) -> IssuedKey:
    """An answer that must name the key that was asked for (never store a secret under another)."""
    issued = _issued(body, where, latest)
    if (issued.key.client_id, issued.key.key_id) != (client_id, key_id):
        raise ProtocolError(f"{where}: the answer names another key than the one asked for")
    return issued


def _reset_judge(client_id: str, key_id: str) -> _Judge:
    return lambda body, where, latest: _issued_for(body, where, client_id, key_id, latest)


def _create_judge(client_id: str, alias: str | None, replaces: str | None) -> _Judge:
    """A create's answer: a key of this client, with the asked alias (when known), whose `Replaces`
    is exactly `replaces` (a successor of another key, or none, would store a secret under the wrong
    key)."""
    def judge(body: Any, where: str, latest: float) -> IssuedKey:
        issued = _issued(body, where, latest)
        if issued.key.client_id != client_id:
            raise ProtocolError(f"{where}: the answer names another Client ID than the one asked for")
        if alias is not None and issued.key.alias != alias:
            raise ProtocolError(f"{where}: the answer names a key of another alias than the one asked for")
        if issued.key.replaces != replaces:
            raise ProtocolError(f"{where}: the answer's 'Replaces' is not the key asked for")
        return issued
    return judge


def _id(row: dict[str, Any], name: str, where: str, echo: bool) -> str:
    value = row.get(name)
    if type(value) is not str:
        raise ProtocolError(f"{where}: field {name!r} missing or not a string")
    if ID_RE.fullmatch(value) is None:
        shown = f" ({excerpt(value)})" if echo else ""
        raise ProtocolError(f"{where}: field {name!r} is not an id{shown}: {ID_RULE}")
    return value


def _date(row: dict[str, Any], name: str, where: str, latest: float, echo: bool) -> int:
    value = row.get(name)
    if type(value) is not int:
        raise ProtocolError(f"{where}: key field {name!r} missing or not an integer")
    if not MIN_DATE <= value <= latest:
        shown = f" ({excerpt(value)})" if echo else ""
        raise ProtocolError(f"{where}: key field {name!r} is not a date in Unix seconds between 2000-01-01 "
                            f"and now (plus the allowed clock skew){shown}")
    return value


def _env(row: dict[str, Any], where: str) -> Environment:
    env = row.get("Environment")
    environment = _ENVIRONMENTS.get(env) if type(env) is str else None
    if environment is None:  # never quoted: a lying answer may put the secret here
        raise ProtocolError(f"{where}: field 'Environment' must be 'PRODUCTION' or 'SANDBOX'")
    return environment


def build(config: KeyServiceConfig, grace_s: float = 0.0) -> HttpKeyService:
    """`kind = "http"`: the contract at `url`, with the management token from `token_env`/`token_file`."""
    token = read_credential(config.token_env, config.token_file, "keyservice management token")
    return HttpKeyService.from_config(config, url=str(config.url), token=token)
