"""The HTTP adapter for keyservice-api.md, with httpx and tenacity.

Every transport or status error is mapped here, in one place, into the project's error tree.
Messages carry the method and path; never a token, a secret or a response body (a reset's body
holds the secret).
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterator
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from rotator.config import KeyServiceConfig
from rotator.domain import ApiKey, ClientInfo, Environment, IssuedKey, Replay, ReplayAnswer, Scope, Secret
from rotator.errors import (
    AuthenticationError,
    BusyError,
    ConflictError,
    ForbiddenError,
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

API = "/v2.01"
MAX_SECRET_LEN = 4096


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class HttpKeyService:
    """Speaks keyservice-api.md. Retries transient failures; a reset retry reuses its key."""

    def __init__(
        self, base_url: str, token: str, *, timeout_s: float = 10.0, max_attempts: int = 5,
        retry_max_wait_s: float = 30.0, retry_initial_s: float = 0.25, per_page: int = 100,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport,
            headers={"Accept": "application/json", "User-Agent": "rotator"},
        )
        self._auth = _Bearer(token)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._max_wait = retry_max_wait_s
        self._initial_wait = retry_initial_s
        self.per_page = per_page

    @classmethod
    def from_config(cls, config: KeyServiceConfig, *, url: str, token: str) -> HttpKeyService:
        return cls(url, token, timeout_s=config.timeout_s, max_attempts=config.max_attempts,
                   retry_max_wait_s=config.retry_max_wait_s, per_page=config.per_page)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpKeyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the KeyService protocol ---------------------------------------------------------
    def list_clients(self) -> Iterator[ClientInfo]:
        for row in self._pages(f"{API}/clients"):
            where = f"GET {API}/clients"
            yield ClientInfo(_str(row, "ClientId", where), _str(row, "Name", where),
                             _env(row, where))

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        path = f"{API}/{client_id}/apikeys"
        for row in self._pages(path):
            yield parse_key(row, f"GET {path}")

    def get_key(self, client_id: str, key_id: str) -> ApiKey:
        path = f"{API}/{client_id}/apikeys/{key_id}"
        return parse_key(self._json("GET", path), f"GET {path}")

    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        """Reset once. Raises `RefusedError` only when the service proved it did not run (a 4xx);
        anything else that is not a usable answer for this key is `InDoubtError`."""
        path = f"{API}/{client_id}/apikeys/{key_id}/reset"
        return self._write_once("POST", path, client_id, key_id, headers={"Idempotency-Key": idempotency_key})

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        """The stored answer of the reset sent with `idempotency_key`, judged for this key and path."""
        path = f"{API}/{client_id}/responses/{idempotency_key}"
        where = f"GET {path}"
        try:
            stored = self._json("GET", path)
        except NotFoundError:
            return ReplayAnswer(Replay.EMPTY)
        except RotatorError as exc:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"replay failed: {exc}")
        status = stored.get("StatusCode") if isinstance(stored, dict) else None
        if type(status) is not int:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"{where}: answer has no integer StatusCode")
        wanted = f"{API}/{client_id}/apikeys/{key_id}/reset"
        if stored.get("RequestURL") not in (None, wanted):
            return ReplayAnswer(Replay.UNKNOWN, reason=f"{where}: the stored answer is for another request")
        if 400 <= status < 500 and status != 409:
            return ReplayAnswer(Replay.REFUSED, reason=f"the stored call had failed with {status}")
        if status != 200:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"{where}: the stored call answered {status}")
        try:
            return ReplayAnswer(Replay.ANSWER, _issued_for(stored.get("Resource"), where, client_id, key_id))
        except ProtocolError as exc:
            return ReplayAnswer(Replay.UNKNOWN, reason=str(exc))

    def create_key(
        self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str
    ) -> IssuedKey:
        path = f"{API}/{client_id}/apikeys"
        payload = {"Alias": alias, "Scopes": [
            {"Scope": s.name, "Read": s.read, "Write": s.write} for s in scopes]}
        body = self._json("POST", path, json=payload, headers={"Idempotency-Key": idempotency_key})
        return _issued(body, f"POST {path}")

    def revoke_key(self, client_id: str, key_id: str) -> None:
        self._request("DELETE", f"{API}/{client_id}/apikeys/{key_id}", expect=(204,))

    def read_sandbox_secret(self, client_id: str, key_id: str) -> Secret:
        path = f"{API}/{client_id}/apikeys/{key_id}/secret"
        return Secret(_str(self._json("GET", path), "Secret", f"GET {path}"))

    def verify_secret(self, client_id: str, secret: Secret) -> bool:
        try:
            self._request(
                "POST", f"{API}/oauth/token", data={"grant_type": "client_credentials"},
                auth=httpx.BasicAuth(client_id, secret.reveal()),
            )
        except AuthenticationError:
            return False
        return True

    # --- transport ---------------------------------------------------------------------------
    def _pages(self, path: str) -> Iterator[dict[str, Any]]:
        """Yield rows page by page; only one page is ever held in memory."""
        page = 1
        while True:
            response = self._request("GET", path, params={"page": page, "per_page": self.per_page})
            rows = _decode(response, f"GET {path}")
            if not isinstance(rows, list):
                raise ProtocolError(f"GET {path}: expected a JSON array")
            yield from rows
            pages = response.headers.get("X-Number-Of-Pages")
            if not rows or (pages is not None and pages.isdigit() and page >= int(pages)):
                return
            page += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _decode(self._request(method, path, **kwargs), f"{method} {path}")

    def _write_once(self, method: str, path: str, client_id: str, key_id: str, **kwargs: Any) -> IssuedKey:
        where = f"{method} {path}"
        try:
            response = self._request(method, path, **kwargs)
        except InDoubtError:
            raise
        except (PermanentError, ThrottledError) as exc:
            raise RefusedError(str(exc), status=exc.status or 400) from None
        except RotatorError as exc:
            raise InDoubtError(str(exc)) from None
        try:
            return _issued_for(_decode(response, where), where, client_id, key_id)
        except ProtocolError as exc:  # a 200 that is no usable answer: it ran, the answer is not in hand
            raise InDoubtError(f"{exc}; the call may have run") from None

    def _request(self, method: str, path: str, *, expect: tuple[int, ...] = (200,),
                 auth: httpx.Auth | None = None, **kwargs: Any) -> httpx.Response:
        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            reraise=True,
        )
        in_doubt = False  # once a try proved nothing (no answer, a 5xx), the call may have run
        try:
            for attempt in retrying:
                with attempt:
                    try:
                        return self._send(method, path, expect, auth or self._auth, kwargs)
                    except (UnansweredError, ServerError, BusyError):
                        in_doubt = True
                        raise
        except RotatorError as exc:
            if in_doubt:
                raise InDoubtError(f"{exc} (after {self._max_attempts} attempts; outcome unknown)") from None
            if isinstance(exc, TransientError):
                raise type(exc)(f"{exc} (gave up after {self._max_attempts} attempts)",
                                retry_after=exc.retry_after) from None
            raise
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, expect: tuple[int, ...], auth: httpx.Auth,
              kwargs: dict[str, Any]) -> httpx.Response:
        where = f"{method} {path}"
        try:
            response = self._client.request(method, path, auth=auth, **kwargs)
        except httpx.TimeoutException:
            raise UnansweredError(f"{where}: no answer within {self._timeout_s:g}s") from None
        except httpx.TransportError as exc:
            raise UnansweredError(f"{where}: connection failed ({type(exc).__name__})") from None
        if response.status_code in expect:
            return response
        raise _status_error(where, response)

    def _wait(self, state: RetryCallState) -> float:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            return min(exc.retry_after, self._max_wait)
        backoff = self._initial_wait * 2 ** (state.attempt_number - 1)
        return float(min(self._max_wait, backoff) * random.uniform(0.5, 1.0))


def _status_error(where: str, response: httpx.Response) -> Exception:
    status = response.status_code
    kind, message = "", ""
    try:
        body = response.json()
        if isinstance(body, dict):
            kind = str(body.get("Type", ""))[:40]
            message = str(body.get("Message", ""))[:200]
    except ValueError:
        pass
    text = f"{where}: {status}" + (f" {kind}" if kind else "") + (f": {message}" if message else "")
    if status >= 500:
        return ServerError(text, retry_after=_retry_after(response))
    if status == 429:
        return ThrottledError(text, retry_after=_retry_after(response))
    if status == 409 and response.headers.get("Retry-After") is not None:
        return BusyError(text, retry_after=_retry_after(response))
    error = {401: AuthenticationError, 403: ForbiddenError, 404: NotFoundError,
             409: ConflictError}.get(status, PermanentError)(text)
    error.status = status
    return error


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _decode(response: httpx.Response, where: str) -> Any:
    try:
        return response.json()
    except ValueError:
        kind = response.headers.get("Content-Type", "no content type")
        raise ProtocolError(
            f"{where}: answer is not valid JSON (status {response.status_code}, {kind}, "
            f"{len(response.content)} bytes)"
        ) from None


_ENVIRONMENTS = {e.value: e for e in Environment}
_SCOPE_CACHE: list[tuple[list[Any], tuple[Scope, ...]]] = []  # most recently used first


def parse_key(row: Any, where: str) -> ApiKey:
    """A key object of the contract, checked field by field.

    This runs once per key in every scan, so the common case is one combined type check; only a
    key that fails it goes through the slow path that names the bad field.
    """
    if isinstance(row, dict):
        client_id, key_id, alias = row.get("ClientId"), row.get("Id"), row.get("Alias")
        created, last = row.get("CreationDate"), row.get("LastResetDate")
        environment = _ENVIRONMENTS.get(row.get("Environment"))  # type: ignore[arg-type]
        if (type(client_id) is str and type(key_id) is str and type(alias) is str
                and type(created) is int and (last is None or type(last) is int)
                and environment is not None):
            return ApiKey(client_id, key_id, alias, environment, _scopes(row.get("Scopes"), where),
                          created, last, row.get("IsAutoGenerated") is True, str(row.get("Status", "ACTIVE")))
    return _parse_key_slowly(row, where)


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
    parsed = tuple(Scope(_str(s, "Scope", where), s.get("Read") is True, s.get("Write") is True)
                   for s in raw if isinstance(s, dict))
    _SCOPE_CACHE.insert(0, (raw, parsed))
    del _SCOPE_CACHE[32:]
    return parsed


def _parse_key_slowly(row: Any, where: str) -> ApiKey:
    if not isinstance(row, dict):
        raise ProtocolError(f"{where}: a key must be a JSON object")
    last = row.get("LastResetDate")
    if last is not None and not isinstance(last, int):
        raise ProtocolError(f"{where}: key field 'LastResetDate' must be an integer or null")
    return ApiKey(
        client_id=_str(row, "ClientId", where),
        key_id=_str(row, "Id", where),
        alias=_str(row, "Alias", where),
        environment=_env(row, where),
        scopes=_scopes(row.get("Scopes"), where),
        created_at=_int(row, "CreationDate", where),
        last_reset_at=last,
        is_auto_generated=bool(row.get("IsAutoGenerated", False)),
        status=str(row.get("Status", "ACTIVE")),
    )


def _issued(body: Any, where: str) -> IssuedKey:
    key = parse_key(body, where)
    secret = body.get("Secret")
    if not isinstance(secret, str) or not secret:
        raise ProtocolError(f"{where}: answer has no Secret")
    if len(secret) > MAX_SECRET_LEN or not secret.isprintable() or not _encodable(secret):
        raise ProtocolError(f"{where}: the Secret is not printable UTF-8 text of at most {MAX_SECRET_LEN} characters")
    return IssuedKey(key, Secret(secret))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate; the exception would carry the text, so drop it
        return False
    return True


def _issued_for(body: Any, where: str, client_id: str, key_id: str) -> IssuedKey:
    """An answer that must name the key that was asked for (never store a secret under another)."""
    issued = _issued(body, where)
    if (issued.key.client_id, issued.key.key_id) != (client_id, key_id):
        raise ProtocolError(f"{where}: the answer names another key than the one asked for")
    return issued


def _str(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: field {name!r} missing or not a string")
    return value


def _int(row: dict[str, Any], name: str, where: str) -> int:
    value = row.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{where}: field {name!r} missing or not an integer")
    return value


def _env(row: dict[str, Any], where: str) -> Environment:
    value = row.get("Environment")
    try:
        return Environment(str(value))
    except ValueError:
        raise ProtocolError(f"{where}: field 'Environment' is {value!r}") from None
