"""Keyed fingerprints: prove two copies of a secret match without revealing either.

HMAC-SHA256 with a per-installation key, truncated to 128 bits. Without the key a fingerprint says
nothing about the secret, so it can sit in Vault metadata, AWS tags and history.
"""

from __future__ import annotations

import hashlib
import hmac

from rotator.domain import Secret

PREFIX = "hs256:"


class Fingerprinter:
    __slots__ = ("_key",)

    def __init__(self, key: str | bytes) -> None:
        raw = key.encode() if isinstance(key, str) else key
        if len(raw) < 16:
            raise ValueError("the fingerprint key must be at least 16 bytes")
        self._key = raw

    def __call__(self, secret: Secret | str) -> str:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        digest = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
        return PREFIX + digest[:32]

    def derive(self, label: bytes) -> bytes:
        """A separate key for another purpose (the reset Idempotency-Keys), from the same secret."""
        return hmac.new(self._key, b"rotator-derive\x00" + label, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "Fingerprinter(key=***)"
