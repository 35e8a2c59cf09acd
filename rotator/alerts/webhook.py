"""A signed JSON webhook of our own, and the check a receiver runs.

Each POST carries `X-Rotator-Timestamp` (Unix seconds) and `X-Rotator-Signature: v1=<hex>`, the
HMAC-SHA256 with the shared secret over `"<timestamp>.<raw body>"`. A receiver recomputes it,
compares in constant time, and refuses a timestamp older than a few minutes (replays).
"""

from __future__ import annotations

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


def sign(secret: str, timestamp: int, body: bytes) -> str:
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
    """`webhook+https://host/path` in the config; the secret comes from `secret_env`."""

    def __init__(self, url: str, secret: str, timeout_s: float = 10.0) -> None:
        self.url = url.removeprefix("webhook+")
        self._secret = secret
        self._timeout_s = timeout_s

    def describe(self) -> str:
        return f"webhook {httpx.URL(self.url).copy_with(query=None, username=None, password=None)}"

    def send(self, event: Event) -> None:
        body = json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        ts = int(time.time())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(ts),
                   SIGNATURE_HEADER: sign(self._secret, ts, body), EVENT_HEADER: event.name,
                   "User-Agent": "rotator"}
        try:
            answer = httpx.post(self.url, content=body, headers=headers, timeout=self._timeout_s)
        except httpx.TimeoutException:
            raise TransientError(f"{self.describe()}: no answer within {self._timeout_s:g}s") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{self.describe()}: {type(exc).__name__}") from None
        if answer.status_code == 429 or answer.status_code >= 500:
            raise TransientError(f"{self.describe()}: {answer.status_code}")
        if answer.status_code >= 400:
            raise PermanentError(f"{self.describe()}: {answer.status_code}")
