"""The tamper-evident audit trail: each history entry chained to the one before, exports with a
signed checkpoint, and their verification. Pure: no Redis, no files (rotator.state writes the
chain; `rotator audit` reads and writes the exports).

An entry's `hash` is SHA-256 over the previous entry's hash (32 bytes) and the entry's canonical
JSON (RFC 8785) without its `hash`; the entry holds its place (`seq`, from 1) and the previous hash
(`prev`; the first entry's is 64 zeros). With `audit.hmac_key_file` it is HMAC-SHA256 under that key
instead, so that whoever can write Redis but does not hold the key cannot recompute the chain
after an edit. An export is JSON Lines, oldest first, ending with a checkpoint in the signed-note
form of transparency logs: the origin, the count of entries chained so far and the head hash
(base64), signed with the exporting process's Ed25519 signing key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "prev", "alg", "hash")
KEYED = "hmac-sha256"
_ED25519 = b"\x01"  # the signed-note algorithm byte of Ed25519


class AuditError(Exception):
    """An export that is not intact, or cannot be read; the message names the first bad entry."""


def canonical(entry: Mapping[str, Any]) -> bytes:
    """RFC 8785. A string RFC 8785 cannot hold (a lone surrogate, as Python reads a byte that is
    not UTF-8 in an argument) is hashed in its backslash-escaped form, the same at every reading."""
    return rfc8785.dumps(_encodable(dict(entry)))


def _encodable(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


def link(prev: str, body: Mapping[str, Any], key: bytes | None = None) -> str:
    """The hash of an entry (`body`: the entry with `seq`, `prev` and `alg`, without `hash`)."""
    data = bytes.fromhex(prev) + canonical(body)
    return hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()


def chained(entry: Mapping[str, Any], seq: int, prev: str, key: bytes | None = None) -> dict[str, Any]:
    """`entry` as the chain's entry number `seq` after `prev`; `alg` says whether it is keyed."""
    body = {k: v for k, v in entry.items() if k not in CHAIN_FIELDS} | {
        "seq": seq, "prev": prev, "alg": KEYED if key else "sha256"}
    return body | {"hash": link(prev, body, key)}


# --- the signed note (C2SP signed-note, tlog-checkpoint) ------------------------------------------
def key_id(name: str, public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + raw).digest()[:4]


@dataclass(frozen=True)
class Checkpoint:
    """The tlog-checkpoint lines (origin, count, head hash), and one extension line naming the
    export's first entry (`first`: the count plus one for an export with none), so that entries
    cut from its start are caught without the previous export."""

    origin: str
    count: int
    head: str  # hex
    first: int | None = None
    keyed: bool = False  # the head entry is keyed: every later entry must be

    def text(self) -> str:
        extension = f"export first {self.first}{' hmac' if self.keyed else ''}\n" if self.first is not None else ""
        return f"{self.origin}\n{self.count}\n{base64.b64encode(bytes.fromhex(self.head)).decode()}\n{extension}"

    def sign(self, name: str, key: Ed25519PrivateKey) -> str:
        """The signed note: the checkpoint's text, a blank line and one signature line."""
        signature = key_id(name, key.public_key()) + key.sign(self.text().encode())
        return f"{self.text()}\n\u2014 {name} {base64.b64encode(signature).decode()}\n"


def open_note(note: str, trusted: Mapping[str, Iterable[Ed25519PublicKey]]) -> tuple[Checkpoint, str]:
    """The checkpoint of a signed note and who signed it, if one signature line verifies under a
    trusted key of its name; raises `AuditError` otherwise."""
    text, sep, signatures = note.partition("\n\n")
    lines = text.split("\n")
    if not sep or len(lines) not in (3, 4) or (len(lines) == 4 and not lines[3].startswith("export first ")):
        raise AuditError("the checkpoint is not a signed note of an origin, a count, a head hash and its export line")
    try:
        export = lines[3].removeprefix("export first ").split(" ") if len(lines) == 4 else []
        if export[1:] not in ([], ["hmac"]):
            raise ValueError(lines[3])
        checkpoint = Checkpoint(lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True).hex(),
                                int(export[0]) if export else None, export[1:] == ["hmac"])
    except ValueError:
        raise AuditError("the checkpoint's count, head hash or first entry cannot be read") from None
    for line in signatures.splitlines():
        dash, _, rest = line.partition(" ")
        name, _, blob = rest.rpartition(" ")
        if dash != "\u2014" or not name:
            continue
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError:
            continue
        for public in trusted.get(name, ()):
            if raw[:4] != key_id(name, public):
                continue
            try:
                public.verify(raw[4:], (text + "\n").encode())
            except InvalidSignature:
                continue
            return checkpoint, name
    raise AuditError("the checkpoint is not signed by a trusted key (--public-key NAME=ed25519:…)")


# --- verification ----------------------------------------------------------------------------
def joins(entries: list[dict[str, Any]], after: Checkpoint) -> None:
    """That an export continues the previous one (`after`): its first entry follows the previous
    head, or, where the two overlap, its entry at the previous count is the previous head."""
    first = entries[0]
    if first["seq"] == after.count + 1 and first["prev"] == after.head:
        return
    same = next((e for e in entries if e.get("seq") == after.count), None)
    if same is not None and same.get("hash") == after.head:
        return
    where = f"line 1 (seq {first['seq']})" if same is None else f"seq {after.count}"
    if first["seq"] == 1 and first["prev"] == GENESIS and after.count > 0:
        raise AuditError(f"{where}: the chain restarted at seq 1 after the previous export (which ends at seq "
                         f"{after.count}): Redis lost its history, or someone deleted it")
    raise AuditError(f"{where}: does not continue the previous export (which ends at seq {after.count}); entries "
                     "up to there were changed since, or entries between the two are missing")



@dataclass(frozen=True)
class Verified:
    count: int  # entries in the file
    first_seq: int
    last_seq: int
    head: str
    signer: str
    unkeyed: int = 0  # with an HMAC key: entries written before it was set


def verify(lines: list[str], trusted: Mapping[str, Iterable[Ed25519PublicKey]], key: bytes | None = None,
           after: Checkpoint | None = None) -> Verified:
    """Check an export: every entry's hash, each entry following the one before (`seq`, `prev`),
    the checkpoint's signature, count, head and first entry; with `after` (the previous export's
    checkpoint), that this export continues it. Raises `AuditError` naming the first entry that
    is not intact."""
    if not lines or not lines[-1].strip():
        raise AuditError("the file is empty")
    try:
        note = json.loads(lines[-1])["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise AuditError("the last line is not the export's checkpoint (the file was cut short?)") from None
    checkpoint, signer = open_note(str(note), trusted)
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AuditError(f"line {number}: not JSON") from None
    if checkpoint.first is None:
        raise AuditError("the checkpoint does not say where the export starts")
    if not entries:
        downgraded(checkpoint, after)
        if checkpoint.first <= checkpoint.count:
            raise AuditError(f"every entry deleted: the checkpoint says the export starts at seq {checkpoint.first}")
        if after is not None and (checkpoint.count, checkpoint.head) != (after.count, after.head):
            raise AuditError("no entries, yet the checkpoint moved since the previous export")
        return Verified(0, checkpoint.count, checkpoint.count, checkpoint.head, signer)
    if entries[0].get("seq") != checkpoint.first:
        raise AuditError(f"line 1 (seq {entries[0].get('seq')}): entries deleted from the start (the checkpoint says "
                         f"the export starts at seq {checkpoint.first})")
    line_of = {e.get("seq"): n for n, e in enumerate(entries, 1)}
    previous: dict[str, Any] | None = None
    keyed_from: int | None = None
    for number, entry in enumerate(entries, 1):
        where = f"line {number} (seq {entry.get('seq')})"
        if not all(isinstance(entry.get(f), t) for f, t in (("seq", int), ("prev", str), ("hash", str))):
            raise AuditError(f"{where}: inserted (it has no place in the chain)")
        seq, prev = entry["seq"], entry["prev"]
        if previous is not None:
            follows(where, number, entry, previous, line_of)
        elif after is not None:
            joins(entries, after)
        if after is not None and after.keyed and seq > after.count and entry.get("alg") != KEYED:
            raise AuditError(f"{where}: unkeyed, after the previous export's keyed head (seq {after.count}): "
                             "rewritten without the HMAC key")
        if entry.get("alg", "sha256") == KEYED:
            if key is None:
                raise AuditError(f"{where}: keyed with the audit HMAC key: pass --hmac-key-file (or configure "
                                 "audit.hmac_key_file)")
            keyed_from = seq if keyed_from is None else keyed_from
        elif keyed_from is not None:
            raise AuditError(f"{where}: an unkeyed entry after keyed ones (from seq {keyed_from}): edited with the "
                             "chain recomputed without the key")
        mac = key if entry.get("alg", "sha256") == KEYED else None
        if link(prev, {k: v for k, v in entry.items() if k != "hash"}, mac) != entry["hash"]:
            hint = " (or the HMAC key differs)" if mac is not None and previous is None else ""
            raise AuditError(f"{where}: edited (its hash does not match its content){hint}")
        previous = entry
    assert previous is not None
    downgraded(checkpoint, after)
    if previous["seq"] != checkpoint.count:
        raise AuditError(f"deleted entries at the end: the file ends at seq {previous['seq']}, the checkpoint "
                         f"counts {checkpoint.count}")
    if previous["hash"] != checkpoint.head:
        raise AuditError(f"line {len(entries)} (seq {previous['seq']}): edited (the checkpoint's head differs)")
    unkeyed = 0 if key is None or keyed_from is None else sum(1 for e in entries if e["seq"] < keyed_from)
    if key is not None and keyed_from is None:
        unkeyed = len(entries)
    return Verified(len(entries), entries[0]["seq"], previous["seq"], previous["hash"], signer, unkeyed)


def downgraded(checkpoint: Checkpoint, after: Checkpoint | None) -> None:
    """A head keyed at the previous export is keyed for good: an unkeyed one now was rewritten."""
    if after is not None and after.keyed and not checkpoint.keyed:
        raise AuditError(f"the head is unkeyed (seq {checkpoint.count}) after the previous export's keyed head "
                         f"(seq {after.count}): rewritten without the HMAC key")


def follows(where: str, number: int, entry: dict[str, Any], previous: dict[str, Any],
            line_of: Mapping[Any, int]) -> None:
    """That `entry` (line `number`) is the one after `previous` in the chain."""
    seq, expected = entry["seq"], previous["seq"] + 1
    if seq == previous["seq"]:
        raise AuditError(f"{where}: seq {seq} twice (lines {number - 1} and {number}): one of them was inserted")
    if seq < previous["seq"]:
        raise AuditError(f"{where}: reordered or inserted (seq {seq} after {previous['seq']})")
    if seq > expected and line_of.get(expected, 0) > number:
        raise AuditError(f"{where}: reordered (seq {expected}, which belongs before it, is at line "
                         f"{line_of[expected]})")
    if seq > expected:
        raise AuditError(f"{where}: deleted entries before it (seq {expected} to {seq - 1} are missing)")
    if entry["prev"] != previous["hash"]:
        raise AuditError(f"{where}: inserted, or the entry before it was edited (it does not follow line "
                         f"{number - 1})")
