"""What every sink shares: its settings base, the stored JSON document and path templates."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rotator.domain import ApiKey, KeyRef, Secret, slug, utc_iso
from rotator.errors import OtherKeyError, PermanentError, ProtocolError, StaleWriteError
from rotator.protocols import SecretRecord, StoredState
from rotator.safety import ID_RULE, UNSAFE_TEXT_RE, excerpt, is_id, variable_named

TEMPLATE_FIELDS = ("client_id", "key_id", "alias", "base_alias", "environment")


class SinkSettings(BaseModel):
    """Base of each sink's `Config`: unknown keys are errors; credentials are checked at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def credential_problems(self, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
        """Every `*_env` that is named but not set, unless its `*_file` twin is given."""
        for name, value in self:
            if not name.endswith("_env") or not isinstance(value, str):
                continue
            file_twin = getattr(self, name[:-4] + "_file", None)
            if file_twin is not None:
                from rotator.config import credential_file_problem

                wrong = credential_file_problem(Path(file_twin))
                if wrong is not None:
                    yield (name[:-4] + "_file", wrong)
            elif not env.get(value):
                yield (name, f"{variable_named(value)} is not set")


MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 1024
_SAMPLE = {"client_id": "client", "key_id": "key", "alias": "alias", "base_alias": "alias", "environment": "production"}


def render(template: str, key: ApiKey) -> str:
    """The one function every sink path goes through: fill `{client_id}`, `{key_id}`, `{alias}` and
    `{base_alias}` (slugged; `ApiKey.base_alias`) and `{environment}`, then refuse what could leave the sink's place.

    Ids must pass the id rule (so each fills exactly its own segment: no `/`, `..`, `%`, NUL); the
    result must be relative, without empty, `.` or `..` segments, NUL or control characters, at most
    255 bytes a segment and 1024 in all, and start with the template's literal prefix (so a key id
    cannot steer `rotator/{client_id}/{key_id}` into another client's path or `auth/token/create`)."""
    where = f"path template {template!r}"
    for field, value in (("client_id", key.client_id), ("key_id", key.key_id)):
        if not is_id(value):
            raise PermanentError(f"{where}: {field} {excerpt(value)} is not an id ({ID_RULE}); "
                                 "no path is built from it")
    path = template.format(
        client_id=key.client_id, key_id=key.key_id, alias=slug(key.alias), base_alias=slug(key.base_alias),
        environment=key.environment.value.lower(),
    )
    problem = path_problem(path, template)
    if problem is not None:
        raise PermanentError(f"{where}: the path for {key.client_id}/{key.key_id} {problem}")
    return path


def path_problem(path: str, template: str) -> str | None:
    """Why a rendered path is refused, or None."""
    if UNSAFE_TEXT_RE.search(path):
        return "contains NUL or control characters"
    if path.startswith("/") or "\\" in path or (len(path) > 1 and path[1] == ":"):
        return "is absolute (or uses backslashes)"
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "has an empty, '.' or '..' segment"
    if any(len(s.encode()) > MAX_SEGMENT_BYTES for s in segments):
        return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    if len(path.encode()) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    if not path.startswith(literal_prefix(template)) or posixpath.normpath(path) != path:
        return "leaves the template's literal prefix"
    return None


def literal_prefix(template: str) -> str:
    """The part of a template before its first field: `rotator/` of `rotator/{client_id}/{key_id}`."""
    return template.split("{", 1)[0]


def sample_path(template: str) -> str:
    """A path the template could build (`rotator/client/key`), for checks made before any key."""
    return template.format(**_SAMPLE)


def check_template(template: str) -> str:
    try:
        sample = template.format(**_SAMPLE)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"template {template!r} may only use {{client_id}}, {{key_id}}, {{alias}}, {{base_alias}}, "
            f"{{environment}} ({type(exc).__name__}: {exc})"
        ) from None
    problem = path_problem(sample, template)
    if problem is not None:
        raise ValueError(f"template {template!r}: a path built from it {problem}")
    if not any(f"{{{name}}}" in template for name in ("key_id", "alias", "base_alias")):
        raise ValueError(f"template {template!r} must use {{key_id}}, {{alias}} or {{base_alias}}: one path per key")
    return template


DOCUMENT_FIELDS: dict[str, str] = {
    "client_id": "the key's Client ID",
    "key_id": "the key's id",
    "alias": "the key's alias",
    "base_alias": "the alias that names the place: its lineage's base alias (`payouts` for `payouts--r3`), "
                  "else `alias`",
    "environment": "`PRODUCTION` (or `SANDBOX`)",
    "api_key": "the secret: what applications read",
    "rotated_at": "when rotator stored it (ISO 8601, UTC, ending in `Z`)",
    "key_reset_at": "the key service's `LastResetDate` of this secret (Unix seconds)",
    "attempt_id": "the rotation that stored it (as in the history and the events)",
    "replaces": "overlap strategy: the key this one took the place of (absent for a reset)",
}


def document(record: SecretRecord) -> dict[str, Any]:
    """The stored JSON object (INTERFACE.md): applications read `api_key`; an AWS IAM key also
    carries the pair under the names AWS tooling reads."""
    key = record.key
    doc = {
        "client_id": key.client_id,
        "key_id": key.key_id,
        "alias": key.alias,
        "base_alias": key.base_alias,
        "environment": key.environment.value,
        "api_key": record.secret.reveal(),
        "rotated_at": utc_iso(record.rotated_at),
        "key_reset_at": record.key_reset_at,
        "attempt_id": record.attempt_id,
    }
    if key.replaces is not None:
        doc["replaces"] = key.replaces
    if key.provider == "aws-iam":
        doc["access_key_id"] = key.key_id
        doc["secret_access_key"] = record.secret.reveal()
    return doc


def encode(record: SecretRecord) -> str:
    return json.dumps(document(record), separators=(",", ":"), sort_keys=True)


def ref_of_document(doc: Any) -> KeyRef | None:
    """The key a stored document names, or None for anything that is not a rotator document."""
    if isinstance(doc, dict) and isinstance(doc.get("api_key"), str) and is_id(doc.get("client_id")) \
            and is_id(doc.get("key_id")):
        return KeyRef(doc["client_id"], doc["key_id"])
    return None


def _checked(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("api_key"), str):
        raise ProtocolError(f"{where}: the stored value is not a rotator secret document")
    return doc


Holder = Literal["key", "predecessor", "successor"]


def holder(doc: Any, where: str, key: ApiKey) -> Holder:
    """Whose stored document this is, seen from `key`: its own, its predecessor's (`key.replaces`, an
    older rotation of the place under the overlap strategy) or its successor's (`key.replaced_by`:
    nothing of `key` is stored there any more).

    Any other key's is an error: two keys whose paths render alike (aliases that slug alike within
    one client) never overwrite one another."""
    if "key_id" not in _checked(doc, where):
        return "key"
    client_id, key_id = doc.get("client_id"), doc.get("key_id")
    if client_id == key.client_id:
        if key_id == key.key_id:
            return "key"
        if key.replaces is not None and key_id == key.replaces:
            return "predecessor"
        if key.replaced_by is not None and key_id == key.replaced_by:
            return "successor"
    raise OtherKeyError(
        f"{where}: holds the secret of another key ({excerpt(client_id)}/{excerpt(key_id)}), not of "
        f"{key.client_id}/{key.key_id}: two keys render to one path (aliases that slug alike?); not "
        "overwritten. Put {key_id} in the path template"
    )


def state_from_document(doc: Any, fingerprint: Any, where: str, version: str | None = None,
                        key: ApiKey | None = None, *, writing: bool = False) -> StoredState | None:
    """Read back a stored document as a `StoredState`; the secret is hashed, then dropped.

    With `key`, the document must be that key's or its predecessor's (see `holder`). Its successor's
    reads as None, and refuses a write of `key` (`writing`): the predecessor never overwrites it."""
    if key is None:
        _checked(doc, where)
    elif holder(doc, where, key) == "successor":
        if writing:
            raise StaleWriteError(f"{where}: holds the secret of {key.ref}'s successor "
                                  f"{excerpt(doc.get('key_id'))}; never overwritten with the replaced key's")
        return None
    reset, key_id, replaces = doc.get("key_reset_at"), doc.get("key_id"), doc.get("replaces")
    return StoredState(
        fingerprint=fingerprint(doc["api_key"]),
        attempt_id=doc.get("attempt_id"),
        rotated_at=doc.get("rotated_at"),
        key_reset_at=reset if isinstance(reset, int) else None,
        version=version,
        key_id=key_id if isinstance(key_id, str) else None,
        replaces=replaces if is_id(replaces) else None,
    )


def secret_from_document(doc: Any, where: str, key: ApiKey) -> Secret | None:
    """`key`'s secret in a stored document, checked as `state_from_document` checks it; None when the
    document is its predecessor's or successor's (the secret there is not `key`'s)."""
    if holder(doc, where, key) != "key":
        return None
    if not doc["api_key"]:
        raise ProtocolError(f"{where}: the stored secret is empty")
    return Secret(doc["api_key"])


def refuse_if_stale(current: StoredState | None, record: SecretRecord, where: str) -> bool:
    """True when `current` already is this record (nothing to write); raise if it is newer."""
    if current is None:
        return False
    if current.fingerprint == record.fingerprint:
        return True
    if current.key_reset_at is not None and current.key_reset_at > record.key_reset_at:
        raise StaleWriteError(
            f"{where}: holds a newer rotation (key reset at {current.key_reset_at}) than attempt "
            f"{record.attempt_id} (key reset at {record.key_reset_at}); not overwritten"
        )
    return False
