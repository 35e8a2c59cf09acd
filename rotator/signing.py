"""Signed task messages: who may order a reset, a create, a revoke or a notification.

Anyone who can write to the broker can put a task message in the queue. Every message a rotator
process publishes therefore carries an Ed25519 signature (`rotator_signature` header) over a
canonical envelope: the task name, id, eta, expiry, retry count, the whole body (arguments and
the embedded callbacks, which a worker would otherwise publish under its own key), the issued-at
time, a fresh message id, the signer's name and the origin (whose action this is). Celery's own
`auth` serializer signs the body alone and leaves the name, eta and expiry in unsigned headers,
and has no replay defence; this covers both.

A worker accepts a message only from a signer in its allow-list (`signing.trusted`), not older
than `signing.max_age_s`, and not already consumed (its message id is recorded when it is
acknowledged, see rotator.gate). The origin differs from the signer only for a relay (beat or a
worker continuing a message: a retry or the scan's fan-out keeps the actor it started with).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import json
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rotator.safety import write_private_file

HEADER = "rotator_signature"
VERSION = 1
PUBLIC_PREFIX = "ed25519:"
#: The message headers a signature covers besides the body (what Celery's message protocol 2 puts there).
SIGNED_HEADERS = ("task", "id", "eta", "expires", "retries", "group", "root_id", "parent_id", "shadow", "timelimit")
#: How far a publisher's clock may run ahead of a worker's.
CLOCK_SKEW_S = 300.0
#: Why a message is refused: the label values of `rotator_messages_refused_total`.
REASONS = ("unsigned", "malformed", "unknown_task", "unknown_signer", "bad_signature", "expired", "not_yet_valid",
           "replayed", "already_done", "origin_not_relayed")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@._:-")


class KeyFileError(Exception):
    """A signing key file that cannot be read or made; the message names the file, never its content."""


def default_name() -> str:
    """`user@host`: who signs when the configuration names no one."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return valid_name(f"{user}@{socket.gethostname()}")


def valid_name(name: str) -> str:
    """A signer name keeps to `[A-Za-z0-9@._:-]`, 1-128 characters (it lands in logs and the audit trail)."""
    cleaned = "".join(c if c in _NAME_CHARS else "_" for c in name)[:128]
    return cleaned or "unnamed"


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_PREFIX + base64.b64encode(raw).decode()


def parse_public(text: str) -> Ed25519PublicKey:
    """`ed25519:<base64 of the 32 raw bytes>`, as `rotator keys init` prints it."""
    if not text.startswith(PUBLIC_PREFIX):
        raise ValueError(f"a public key is {PUBLIC_PREFIX}<base64>, as `rotator keys init` prints it")
    try:
        raw = base64.b64decode(text.removeprefix(PUBLIC_PREFIX), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise ValueError("not a base64 Ed25519 public key of 32 bytes") from None


def write_private_key(path: Path) -> Ed25519PrivateKey:
    """A new key in a new file (PEM, PKCS#8, mode 0600); FileExistsError when the file is there
    (another process made it first): an existing key is never replaced."""
    key = Ed25519PrivateKey.generate()
    write_private_file(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return key


def read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the signing key {path}: {type(exc).__name__}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key (`rotator keys init` makes one)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 key")
    if os.stat(path).st_mode & 0o027:  # a group may read it (a Kubernetes Secret mounted 0440), no one else
        raise KeyFileError(f"{path} is open to other users (or writable by its group): chmod 600 it")
    return key


def load_or_make(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, made there first when it is missing (the embedded default)."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            return write_private_key(path)
    return read_private_key(path)


def canonical(envelope: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII only, tuples as lists, so the
    publisher's objects and the worker's decoded JSON give the same bytes."""
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def envelope(headers: Mapping[str, Any], body: Any, stamp: Mapping[str, Any]) -> dict[str, Any]:
    signed = {name: headers.get(name) for name in SIGNED_HEADERS}
    return {"v": VERSION, "headers": signed, "body": body, "signer": stamp.get("signer"),
            "origin": stamp.get("origin"), "iat": stamp.get("iat"), "mid": stamp.get("mid")}


@dataclass(frozen=True)
class Signer:
    name: str
    key: Ed25519PrivateKey

    def stamp(self, headers: Mapping[str, Any], body: Any, origin: str, now: float) -> dict[str, Any]:
        """The `rotator_signature` header for one message about to be published."""
        stamp: dict[str, Any] = {"v": VERSION, "signer": self.name, "origin": origin, "iat": round(now, 3),
                                 "mid": uuid.uuid4().hex}
        signature = self.key.sign(canonical(envelope(headers, body, stamp)))
        return {**stamp, "sig": base64.b64encode(signature).decode()}

    def public(self) -> str:
        return public_text(self.key.public_key())


@dataclass(frozen=True)
class Verdict:
    """What the gate decided about one message; `actor` is the identity the audit trail records."""

    accepted: bool
    reason: str = ""
    signer: str = ""
    actor: str = ""
    mid: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Verifier:
    trusted: Mapping[str, tuple[Ed25519PublicKey, ...]]
    relays: frozenset[str] = field(default_factory=frozenset)
    max_age_s: float = 86_400.0

    def check(self, headers: Mapping[str, Any], body: Any, now: float) -> Verdict:
        """Signature, signer and age of one message (whether it was consumed before is the gate's to ask)."""
        stamp = headers.get(HEADER)
        if stamp is None:
            return Verdict(False, "unsigned")
        if not isinstance(stamp, Mapping) or stamp.get("v") != VERSION:
            return Verdict(False, "malformed", detail="the signature header is not a version-1 stamp")
        signer, origin, iat, mid, sig = (stamp.get(k) for k in ("signer", "origin", "iat", "mid", "sig"))
        if not (isinstance(signer, str) and isinstance(origin, str) and isinstance(mid, str) and isinstance(sig, str)
                and isinstance(iat, int | float) and not isinstance(iat, bool)):
            return Verdict(False, "malformed", detail="a field of the stamp is missing or of the wrong type")
        shown = valid_name(signer)
        keys = self.trusted.get(signer)
        if not keys:
            return Verdict(False, "unknown_signer", signer=shown, mid=mid)
        try:
            signature = base64.b64decode(sig, validate=True)
        except binascii.Error:
            return Verdict(False, "malformed", signer=shown, mid=mid, detail="the signature is not base64")
        data = canonical(envelope(headers, body, stamp))
        if not any(_verifies(key, signature, data) for key in keys):
            return Verdict(False, "bad_signature", signer=shown, mid=mid)
        if iat > now + CLOCK_SKEW_S:
            return Verdict(False, "not_yet_valid", signer=shown, mid=mid,
                           detail=f"issued {iat - now:.0f}s in the future (clock skew?)")
        if now - iat > self.max_age_s:
            return Verdict(False, "expired", signer=shown, mid=mid,
                           detail=f"issued {now - iat:.0f}s ago; signing.max_age_s is {self.max_age_s:g}")
        if origin != signer and signer not in self.relays:
            return Verdict(False, "origin_not_relayed", signer=shown, mid=mid,
                           detail="names another origin but is not in signing.relays")
        return Verdict(True, signer=shown, actor=valid_name(origin), mid=mid)


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
