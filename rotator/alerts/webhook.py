"""A signed JSON webhook, by the Standard Webhooks scheme (https://www.standardwebhooks.com).

Each POST carries `webhook-id` (the same for every retry of one delivery, so a receiver can drop
a replay or a duplicate), `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64>`,
the HMAC-SHA256 over `"<id>.<timestamp>.<raw body>"`. Receivers verify it with any Standard
Webhooks library: the key is the secret's bytes (a `whsec_<base64>` secret: the decoded bytes).
For the receivers of earlier releases the request also carries their scheme, `X-Rotator-Timestamp`
and `X-Rotator-Signature: v1=<hex>` over `"<timestamp>.<raw body>"` (`verify_signature`).
`X-Rotator-Event` only names the event for routing; the signed body's `event` is the one to trust.
Only a 2xx answer counts as delivered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time

import httpx

from rotator.errors import PermanentError, TransientError
from rotator.protocols import Event

SIGNATURE_HEADER = "X-Rotator-Signature"
TIMESTAMP_HEADER = "X-Rotator-Timestamp"
EVENT_HEADER = "X-Rotator-Event"
MAX_TOLERANCE_S = 300
# A plain integer: ASCII digits, no sign, no leading zero, no spaces or underscores (int() takes all those).
_TIMESTAMP_RE = re.compile(r"0|[1-9][0-9]{0,11}")


WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 16


def signing_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature: a `whsec_<base64>` secret's decoded bytes,
    any other secret's UTF-8 bytes (its receiver passes `whsec_` + base64 of it to a library)."""
    if secret.startswith(SECRET_PREFIX):
        body = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise PermanentError("a webhook secret starting with whsec_ must be base64 after it") from None
        if len(key) < MIN_KEY_BYTES:
            raise PermanentError(f"a whsec_ webhook secret must decode to at least {MIN_KEY_BYTES} bytes")
        return key
    return secret.encode()


def message_id(body: bytes) -> str:
    """One delivery's id: the same for each retry of it (the body, with the event's time, is)."""
    return "msg_" + hashlib.sha256(body).hexdigest()[:32]


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The earlier releases' signature (`X-Rotator-Signature`), still sent beside the standard one."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str, *,
                     tolerance_s: int = MAX_TOLERANCE_S, now: float | None = None) -> bool:
    """What a receiver runs: True only for a timestamp that is a plain integer (ASCII digits, no
    sign, no leading zero) within ±`tolerance_s` (at most 300 s) of now, and a matching signature."""
    if not isinstance(timestamp, str) or not _TIMESTAMP_RE.fullmatch(timestamp):
        return False
    if not isinstance(signature, str) or not signature.isascii():
        return False
    ts = int(timestamp)
    if abs((time.time() if now is None else now) - ts) > min(tolerance_s, MAX_TOLERANCE_S):
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


class SignedWebhook:
    """`webhook+https://host/path` in the config; the secret comes from `secret_env` or `secret_file`."""

    def __init__(self, url: str, secret: str, timeout_s: float = 10.0) -> None:
        self.url = url.removeprefix("webhook+")
        self._secret = secret
        self._key = signing_key(secret)
        self._timeout_s = timeout_s

    def describe(self) -> str:
        return f"webhook {httpx.URL(self.url).copy_with(query=None, username=None, password=None)}"

    def send(self, event: Event) -> None:
        body = json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        post_signed(self.url, self._secret, body, event.name, self._timeout_s, self.describe())


def post_signed(url: str, secret: str, body: bytes, event: str, timeout_s: float, described: str) -> None:
    """POST `body` signed both ways (module docstring); only a 2xx answer is a delivery. A time-out,
    a dropped connection, 408, 429 and 5xx are TransientError; anything else PermanentError."""
    ts = int(time.time())
    msg_id = message_id(body)
    headers = {"Content-Type": "application/json", WEBHOOK_ID: msg_id, WEBHOOK_TIMESTAMP: str(ts),
               WEBHOOK_SIGNATURE: standard_signature(signing_key(secret), msg_id, ts, body),
               TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(secret, ts, body),
               EVENT_HEADER: event, "User-Agent": "rotator"}
    try:
        answer = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        raise TransientError(f"{described}: no answer within {timeout_s:g}s") from None
    except httpx.TransportError as exc:
        raise TransientError(f"{described}: {type(exc).__name__}") from None
    if answer.status_code in (408, 429) or answer.status_code >= 500:
        raise TransientError(f"{described}: {answer.status_code}")
    if answer.status_code >= 400:
        raise PermanentError(f"{described}: {answer.status_code}")
    if not 200 <= answer.status_code < 300:  # a redirect is not followed: the event did not arrive
        raise PermanentError(f"{described}: {answer.status_code} (only a 2xx answer is a delivery; "
                             "redirects are not followed)")
